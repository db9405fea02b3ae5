"""Speed of radiomics extraction: images/s with 1 and N workers, a cached rerun, and
time vs number of images.

Runs on real chest X-rays (tb_cxr_2site, 256 px, lung masks from the manifest's
``lung_mask`` column, or automatic body masks with --mask auto), half from each site.
Each worker count starts from an empty cache; the rerun reuses the last one. Targets:
2 workers >= 1.8x one worker; the cached rerun >= 50x faster than the first run. The
growth curve times the last worker count on --growth image counts (cold caches) and
fits seconds = slope * images + intercept (the intercept: pool start-up, bin width).

    python eval/bench/bench_radiomics.py --out eval_out/bench
    python eval/bench/bench_radiomics.py --n 40 --workers 1 2 --mask auto --out auto_bench
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from harmonize.data.manifest import load_manifest
from harmonize.evaluation.bench_support import linear_fit, loglog_slope, verdict, write_json
from harmonize.radiomics import RadiomicsSettings, extract_features
from harmonize.radiomics.extract import available_cpus, feature_columns

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "tb_cxr_2site"


def pick_images(manifest: Path, n: int, mask: str, seed: int = 0) -> pd.DataFrame:
    """n images with lung masks, balanced across sites, in manifest order."""
    df = load_manifest(manifest, mask_column="lung_mask")
    df = df[df["mask"] != ""]
    sites = sorted(df["site"].unique())
    per_site = -(-n // len(sites))
    picked = pd.concat([df[df["site"] == s].sample(min(per_site, (df["site"] == s).sum()),
                                                   random_state=seed) for s in sites])
    picked = picked.sort_index().head(n).reset_index(drop=True)
    if mask == "auto":
        picked["mask"] = ""
    return picked


def _warm(_: int) -> int:
    import radiomics  # noqa: F401  what a worker imports before its first image

    return os.getpid()


def pool_startup_seconds(workers: int) -> float:
    """Wall time to spawn `workers` processes that import pyradiomics: a fixed cost that
    every multi-worker run pays once, and that a small benchmark does not amortize."""
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(_warm, range(workers)))
    return time.perf_counter() - start


def timed(df: pd.DataFrame, settings: RadiomicsSettings, workers: int, cache: Path):
    start = time.perf_counter()
    features, errors = extract_features(df, settings, workers=workers, cache_dir=cache,
                                        progress=False)
    return time.perf_counter() - start, features, errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA / "manifest.csv",
                    help="manifest with a lung_mask column (default: tb_cxr_2site)")
    ap.add_argument("--n", type=int, default=300, help="images (default 300)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="worker counts to time; the first is the baseline (default 1 2)")
    ap.add_argument("--mask", choices=("manifest", "auto"), default="manifest",
                    help="lung masks from the manifest, or automatic body masks")
    ap.add_argument("--growth", type=int, nargs="*", default=[25, 50, 100, 200, 400],
                    help="image counts for the time-vs-images curve (none: skip)")
    ap.add_argument("--out", type=Path, required=True,
                    help="folder for radiomics.json and radiomics_growth.csv")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.data.is_file():
        print(f"error: manifest {args.data} not found (--data)", file=sys.stderr)
        return 1

    df = pick_images(args.data, args.n, args.mask)
    start = time.perf_counter()
    settings = RadiomicsSettings.from_data(df)
    bin_seconds = time.perf_counter() - start
    print(settings.bin_choice.describe())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows, reference = [], None
    with tempfile.TemporaryDirectory(prefix="bench_radiomics_") as tmp:
        for w in args.workers:
            cache = Path(tmp) / f"w{w}"
            seconds, features, errors = timed(df, settings, w, cache)
            if reference is None:
                reference = features
            rows.append({"workers": w, "seconds": seconds, "images_per_s": len(df) / seconds,
                         "errors": len(errors),
                         "same_as_first": bool(features.equals(reference))})
        w_last = args.workers[-1]
        cached_seconds, cached, _ = timed(df, settings, w_last, Path(tmp) / f"w{w_last}")
        growth = []
        for n in args.growth:
            part = pick_images(args.data, n, args.mask)
            seconds, _, _ = timed(part, RadiomicsSettings.from_data(part), w_last,
                                  Path(tmp) / f"growth{n}")
            growth.append({"images": len(part), "workers": w_last, "seconds": seconds})
            print(f"growth: {len(part)} images, {w_last} workers: {seconds:.2f} s")
    startup = {w: pool_startup_seconds(w) for w in args.workers if w > 1}

    base = rows[0]
    for r in rows:
        r["speedup_vs_first"] = r["images_per_s"] / base["images_per_s"]
        r["pool_startup_s"] = startup.get(r["workers"], 0.0)
        busy = r["seconds"] - r["pool_startup_s"]
        r["images_per_s_after_startup"] = len(df) / busy if busy > 0 else None
    cold = rows[-1]["seconds"]
    result = {
        "images": len(df), "size": "256x256", "mask": args.mask,
        "sites": df["site"].value_counts().to_dict(),
        "features": len(feature_columns(reference)),
        "bin_width": settings.bin_width, "bin_width_rule": settings.bin_choice.describe(),
        "bin_width_seconds": bin_seconds,
        "seconds_per_image_1_worker": (base["seconds"] / len(df)
                                       if base["workers"] == 1 else None),
        "runs": rows,
        "cached_rerun": {"workers": w_last, "seconds": cached_seconds, "cold_seconds": cold,
                         "cached_over_cold": cached_seconds / cold,
                         "same_values": bool(cached.equals(reference))},
        "machine": {"cpus_available": available_cpus(), "load_1min_at_start": load,
                    "python": platform.python_version()},
    }
    if len(growth) >= 2:
        g = pd.DataFrame(growth)
        g.to_csv(args.out / "radiomics_growth.csv", index=False)
        slope, intercept = linear_fit(g["images"], g["seconds"])
        result["growth"] = {"rows": growth, "seconds_per_image": slope,
                            "fixed_seconds": intercept,
                            "exponent": loglog_slope(g["images"], g["seconds"])}
    print(f"\n{len(df)} images ({args.mask} masks), {result['features']} features, "
          f"{available_cpus()} CPUs available, load {load}")
    print(f"{'workers':>7} {'seconds':>8} {'img/s':>7} {'speedup':>8} {'startup s':>10} "
          f"{'img/s w/o startup':>18} {'same':>5}")
    for r in rows:
        after = r["images_per_s_after_startup"]
        print(f"{r['workers']:>7} {r['seconds']:>8.2f} {r['images_per_s']:>7.1f} "
              f"{r['speedup_vs_first']:>8.2f} {r['pool_startup_s']:>10.2f} "
              f"{after if after is None else round(after, 1)!s:>18} "
              f"{'yes' if r['same_as_first'] else 'NO':>5}")
    c = result["cached_rerun"]
    print(f"cached rerun ({w_last} workers): {c['seconds']:.3f} s vs {cold:.2f} s cold "
          f"(ratio {c['cached_over_cold']:.4f}, same values: {c['same_values']})")
    if len(rows) > 1:
        print(f"{rows[-1]['workers']} workers / {rows[0]['workers']}: "
              f"{rows[-1]['speedup_vs_first']:.2f}x {verdict(rows[-1]['speedup_vs_first'], 1.8)}")
    print(f"cached rerun speed-up: {1 / c['cached_over_cold']:.0f}x "
          f"{verdict(1 / c['cached_over_cold'], 50)}")
    if "growth" in result:
        gr = result["growth"]
        print(f"growth: {gr['seconds_per_image']:.3f} s per image + {gr['fixed_seconds']:.2f} s "
              f"fixed (exponent {gr['exponent']:.2f})")
    write_json(args.out / "radiomics.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
