"""`harmonize apply` speed and memory with a CycleGAN of the reference architecture.

1. Throughput at 256 px: the generator's pure forward pass (batches of 8 tiles already
   in memory, inference mode) vs `apply_translator` end to end on 16-bit PNG files
   (decode, intensity policy, polarity check, forward, write) in the same run, fp32 and
   bf16 autocast. Targets: apply >= 0.8x forward; bf16 >= 1.7x fp32; mean SSIM between
   the bf16 and fp32 outputs > 0.995 (of a trained generator: --model).
2. Growth: seconds per image vs side (256 to 2048 px, tiles of 256 px overlapping 25%,
   the default precision), each size in a fresh process running `harmonize apply`, with
   its peak resident memory; fitted exponent of time vs pixels.
3. Memory: peak RSS of apply on a 2048x2048 16-bit image (target < 2 GB).

    python eval/bench/bench_apply.py --out eval_out/bench \\
        --model eval_out/bench/train_cyclegan/curve_bf16_seed0/model
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eval/bench/bench_diffusion.py

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from harmonize.apply import apply_translator
from harmonize.data.io import read_image
from harmonize.evaluation.bench_support import (
    forward_speed,
    loglog_slope,
    machine,
    verdict,
    write_json,
)
from harmonize.metrics import ssim
from harmonize.synth import make_phantom
from harmonize.training.device import resolve_precision
from harmonize.translators import CycleGANTranslator, load_translator
from harmonize.translators.cyclegan.networks import ResnetGenerator

TILE = 256
CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from harmonize.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def reference_translator(model: str | None) -> CycleGANTranslator:
    """The reference architecture: a trained checkpoint, or freshly initialized weights
    (same arithmetic; the SSIM check then says nothing and is skipped)."""
    if model:
        t = load_translator(model)
        if not isinstance(t, CycleGANTranslator) or (t.ngf, t.n_blocks) != (64, 9):
            raise SystemExit(f"{model}: not a CycleGAN of the reference architecture "
                             "(ngf 64, 9 blocks)")
    else:
        g = ResnetGenerator(ngf=64, n_blocks=9)
        t = CycleGANTranslator().set_trained(g, np.ones((32, 32), np.float32), "reference")
    t.tile_size, t.batch_size, t.polarity = TILE, 8, "keep"
    return t


def write_inputs(folder: Path, side: int, n: int, seed: int = 0) -> list[Path]:
    """n 16-bit (12 bits used) PNG X-ray phantoms of side x side px."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(seed)
    for k in range(n):
        x = make_phantom("xray", side, False, rng).ideal
        x = (x - x.min()) / (x.max() - x.min())
        path = folder / f"img_{k:03d}.png"
        sitk.WriteImage(sitk.GetImageFromArray(np.rint(x * 4095).astype(np.uint16)), str(path))
        paths.append(path)
    return paths


def apply_img_per_s(t: CycleGANTranslator, folder: Path, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t.transform([np.zeros((TILE, TILE), np.float32)])  # warm-up, as forward had
    started = time.perf_counter()
    summary = apply_translator(t, folder, out, batch_size=t.batch_size, progress=False)
    seconds = time.perf_counter() - started
    if summary.errors:
        raise SystemExit(f"apply failed on {summary.error_files}")
    return summary.ok / seconds


def throughput(t: CycleGANTranslator, work: Path, n: int, trained: bool) -> dict:
    folder = work / "in256"
    write_inputs(folder, TILE, n)
    res: dict = {}
    for precision in ("fp32", "bf16"):
        t.precision = precision
        fwd = forward_speed(t.generator_, n, t.batch_size, precision)
        app = apply_img_per_s(t, folder, work / f"out256_{precision}")
        res[precision] = {"forward_img_per_s": fwd, "apply_img_per_s": app,
                          "apply_over_forward": app / fwd}
        print(f"{precision}: forward {fwd:.2f} img/s, apply {app:.2f} img/s "
              f"({app / fwd:.2f} of forward)")
    res["bf16_over_fp32_apply"] = res["bf16"]["apply_img_per_s"] / res["fp32"]["apply_img_per_s"]
    res["bf16_over_fp32_forward"] = (res["bf16"]["forward_img_per_s"]
                                     / res["fp32"]["forward_img_per_s"])
    if trained:
        def model_space(path: Path) -> np.ndarray:
            image = read_image(path)
            lo, hi = image.value_range
            return (image.array.astype(np.float32) - lo) / (hi - lo)

        scores = [ssim(model_space(work / "out256_fp32" / p.name),
                       model_space(work / "out256_bf16" / p.name))
                  for p in sorted(folder.glob("*.png"))]
        res["ssim_bf16_vs_fp32"] = {"mean": float(np.mean(scores)),
                                    "min": float(np.min(scores)), "n": len(scores)}
    return res


def growth(model_dir: Path, work: Path, sides: list[int], pixels_per_size: int) -> pd.DataFrame:
    """Each size in a fresh `harmonize apply` process: seconds per image and peak RSS."""
    rows = []
    for side in sides:
        n = max(1, pixels_per_size // side**2)
        folder = work / f"in{side}"
        write_inputs(folder, side, n, seed=side)
        out = work / f"out{side}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-c", CHILD, "apply", "-q", "--model",
                               str(model_dir), str(folder), str(out)],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"apply at {side} px failed:\n{proc.stderr[-2000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        log = pd.read_csv(out / "apply_log.csv")
        rows.append({"side": side, "pixels": side * side, "images": n,
                     "process_seconds": child["seconds"],
                     "seconds_per_image": float(log["seconds"].max()) if n == 1 else
                     child["seconds"] / n, "peak_rss_mb": child["peak_rss_mb"]})
        print(f"{side} px: {rows[-1]['seconds_per_image']:.2f} s/img, peak RSS "
              f"{child['peak_rss_mb']:.0f} MB ({n} image(s))")
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("eval_out/bench"))
    p.add_argument("--model", default=None, help="trained reference-architecture CycleGAN")
    p.add_argument("--images", type=int, default=32, help="256 px images for throughput")
    p.add_argument("--sides", type=int, nargs="+", default=[256, 512, 1024, 2048])
    args = p.parse_args(argv)
    work = args.out / "apply"
    work.mkdir(parents=True, exist_ok=True)
    t = reference_translator(args.model)
    res = {"architecture": "ResNet generator, ngf 64, 9 blocks, 1 channel",
           "model": args.model or "freshly initialized (no SSIM check)",
           "tile": TILE, "tile_overlap": t.tile_overlap, "batch": t.batch_size,
           "io_workers": 2, "throughput_256px": throughput(t, work, args.images,
                                                           args.model is not None)}
    # the growth runs use the checkpoint as a user would, at its default precision
    model_dir = work / "model"
    t.precision = "auto"
    t.save(model_dir)
    res["default_precision"] = resolve_precision("auto", "cpu")
    table = growth(model_dir, work, args.sides, pixels_per_size=2 * 1024 * 1024)
    table.to_csv(args.out / "apply_growth.csv", index=False)
    res["growth"] = {"seconds_vs_pixels_exponent": loglog_slope(table["pixels"],
                                                                table["seconds_per_image"]),
                     "seconds_per_megapixel": (table["seconds_per_image"]
                                               / (table["pixels"] / 1e6)).tolist(),
                     "rows": table.to_dict("records")}
    res["peak_rss_mb_2048"] = (float(table.loc[table["side"] == 2048, "peak_rss_mb"].iloc[0])
                               if 2048 in args.sides else None)
    res["machine"] = machine()
    write_json(args.out / "apply.json", res)

    tp = res["throughput_256px"]
    share = {p: tp[p]["apply_over_forward"] for p in ("fp32", "bf16")}
    print(f"\napply / forward at 256 px: fp32 {share['fp32']:.2f}, bf16 {share['bf16']:.2f} "
          f"{verdict(min(share.values()), 0.8)}")
    print(f"bf16 / fp32 apply throughput: {tp['bf16_over_fp32_apply']:.2f} "
          f"{verdict(tp['bf16_over_fp32_apply'], 1.7)}")
    if "ssim_bf16_vs_fp32" in tp:
        s = tp["ssim_bf16_vs_fp32"]
        print(f"SSIM bf16 vs fp32 outputs: mean {s['mean']:.4f} (min {s['min']:.4f}) "
              f"{verdict(s['mean'], 0.995)}")
    print(f"time vs pixels exponent: {res['growth']['seconds_vs_pixels_exponent']:.2f}")
    if res["peak_rss_mb_2048"] is not None:
        print(f"peak RSS at 2048x2048: {res['peak_rss_mb_2048']:.0f} MB "
              f"{verdict(res['peak_rss_mb_2048'], 2048, at_most=True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
