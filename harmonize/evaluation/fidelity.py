"""Paired fidelity: SSIM / PSNR of a translated image against the same anatomy as the
reference site acquired it (the synthetic benchmark's `reference/` renderings).

One scorer for the demo and every eval script, so their numbers compare: both images in
model space, clipped to [0, 1] (the window a written file can hold; the percentile
policy may leave values outside it), data_range 1 (torchmetrics would otherwise
estimate it from the data, which misleads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.metrics import bootstrap_mean_ci, psnr, ssim

METRICS = ("ssim", "psnr")


def prepare_benchmark(out: Path, sites: int, per_site: int, size: int, seed: int = 0,
                      test_size: float = 0.5, progress: bool = False
                      ) -> tuple[Path, Path, dict]:
    """The synthetic benchmark in OUT/synth, split by patient into OUT/train.csv and
    OUT/test.csv (translators train on the first, are scored on the second): returns
    (train manifest, test manifest, the benchmark's synth.json content)."""
    from harmonize.data.manifest import load_manifest, save_manifest
    from harmonize.data.splits import patient_split
    from harmonize.synth import generate

    info = generate(out / "synth", sites=sites, per_site=per_site, size=size, seed=seed,
                    progress=progress)
    df = patient_split(load_manifest(out / "synth" / "manifest.csv"), test_size=test_size,
                       seed=seed)
    train_csv, test_csv = out / "train.csv", out / "test.csv"
    save_manifest(df[df["split"] == "train"], train_csv)
    save_manifest(df[df["split"] == "test"], test_csv)
    return train_csv, test_csv, info


def fidelity_image(path: str | Path, policy: IntensityPolicy | None = None) -> np.ndarray:
    """A file as the scorer sees it: model space, clipped to [0, 1]."""
    x, _ = (policy or IntensityPolicy()).to_model(read_image(path))
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def score_pair(image: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    a = np.clip(image, 0.0, 1.0).astype(np.float32)
    b = np.clip(truth, 0.0, 1.0).astype(np.float32)
    return {"ssim": ssim(a, b), "psnr": psnr(a, b)}


def score_images(outputs: Sequence[np.ndarray], truths: Sequence[np.ndarray]
                 ) -> pd.DataFrame:
    """One row (ssim, psnr) per (output, truth) pair, in order."""
    return pd.DataFrame([score_pair(o, t) for o, t in zip(outputs, truths, strict=True)])


def score_files(test: pd.DataFrame, truth_root: Path,
                methods: dict[str, Callable[[dict], Path]], progress: bool = False
                ) -> pd.DataFrame:
    """Rows of `test` (path, site, relpath, reference_path; label kept when present)
    scored for each method; `methods[name](row)` gives that method's image of the row.
    Columns: relpath, site, [label,] method, ssim, psnr, image_path, truth_path."""
    from tqdm import tqdm

    rows = []
    for rec in tqdm(test.to_dict("records"), desc="fidelity", unit="img", disable=not progress):
        truth_path = Path(truth_root) / rec["reference_path"]
        truth = fidelity_image(truth_path)
        for method, where in methods.items():
            path = Path(where(rec))
            rows.append({"relpath": rec["relpath"], "site": rec["site"],
                         **({"label": rec["label"]} if "label" in rec else {}),
                         "method": method, **score_pair(fidelity_image(path), truth),
                         "image_path": str(path), "truth_path": str(truth_path)})
    return pd.DataFrame(rows)


def score_harmonized(test: pd.DataFrame, out: Path, methods: list[str]) -> pd.DataFrame:
    """`score_files` for each method: "identity" is the input file itself, any other
    method its output in OUT/harmonized/<method>/<relpath>; truths in OUT/synth."""
    return score_files(test, out / "synth", {
        m: (lambda rec, m=m: rec["path"] if m == "identity"
            else out / "harmonized" / m / rec["relpath"]) for m in methods})


def ci_cell(stats: dict, width: int, signed: bool = False) -> str:
    """'mean [lo,hi]' of a `mean_ci` entry, each number `width` wide."""
    f = f"{'+' if signed else ''}{width}.3f"
    lo, hi = stats["ci95"]
    return f"{stats['mean']:{f}} [{lo:{f}},{hi:{f}}]"


def mean_ci(values) -> dict:
    """{"mean", "ci95": [lo, hi]} by percentile bootstrap of the mean."""
    mean, lo, hi = bootstrap_mean_ci(np.asarray(values, dtype=float))
    return {"mean": mean, "ci95": [lo, hi]}


def summarize(rows: pd.DataFrame, baseline: str | None = "identity") -> dict:
    """Per scope ("all", then each site) and method: n and the mean of each metric with
    its 95% bootstrap CI; with a `baseline` method, each other method's paired
    per-image difference to it ("minus_<baseline>")."""
    out: dict = {}
    for scope, part in [("all", rows), *part_by_site(rows)]:
        entry: dict = {}
        wide = part.pivot(index="relpath", columns="method", values=list(METRICS))
        for method, g in part.groupby("method", sort=False):
            entry[method] = {"n": len(g), **{m: mean_ci(g[m]) for m in METRICS}}
            if baseline and method != baseline and baseline in wide[METRICS[0]]:
                entry[method][f"minus_{baseline}"] = {
                    m: mean_ci(wide[m][method] - wide[m][baseline]) for m in METRICS}
        out[str(scope)] = entry
    return out


def part_by_site(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(str(site), g) for site, g in rows.groupby("site")]
