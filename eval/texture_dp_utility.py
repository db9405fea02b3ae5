"""What patient-level DP costs federated texture matching, by the reference site's size.

The demo's 4-site benchmark (64 px, the anatomy masks as ROI, `fingerprints:
everywhere`) with N patients per site. Texture matching is fitted three ways: centrally,
and federated with `privacy.mode: patient-dp` at epsilon 10 and 1 (delta 1e-5; the
reference node releases its targets once, `harmonize.federated.texture_dp`; every node,
the reference's too, fits its own site at home). Scored on every non-reference image:
SSIM to the paired truth (mean [95% CI]), and the mean absolute difference to the
central translator's output. Each DP release draws fresh noise (OS entropy), so a rerun
gives other numbers; `--repeats` releases per cell are averaged.

    python eval/texture_dp_utility.py --per-site 80,400 --out eval_out/texture_dp

Writes OUT/texture_dp.csv.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.data.manifest import load_manifest
from harmonize.evaluation.fidelity import fidelity_image, mean_ci, score_images
from harmonize.federated.config import FederatedConfig
from harmonize.federated.texture_task import TextureTask
from harmonize.fit import model_space_images_with_masks
from harmonize.synth import generate
from harmonize.translators import TextureMatching, load_translator

PREVALENCE = [0.5, 0.8, 0.2, 0.5]
PARAMS = {"fingerprints": "everywhere", "spectrum": "site"}  # as measured in docs/federated.md


def outputs_by_site(models: dict[str, TextureMatching], nodes: dict[str, pd.DataFrame]
                    ) -> dict[str, list[np.ndarray]]:
    """Each non-reference node's images through its own translator."""
    out = {}
    for site, rows in nodes.items():
        model = models[site]
        images, sites, masks = zip(*model_space_images_with_masks(rows, model.policy, False),
                                   strict=True)
        out[site] = [np.clip(y, 0, 1) for y in model.transform(images, sites, masks=masks)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-site", default="80,400")
    p.add_argument("--epsilons", default="10,1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="eval_out/texture_dp")
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = []
    for n in (int(v) for v in args.per_site.split(",")):
        data = out / f"synth_{n}"
        if not (data / "manifest.csv").exists():
            generate(data, sites=4, per_site=n, size=64, seed=0, prevalence=PREVALENCE,
                     finding_scale=2.5, progress=False)
        manifest = data / "manifest.csv"
        df = load_manifest(manifest)
        nodes = {s: r.reset_index(drop=True) for s, r in df.groupby("site")}
        others = {s: r for s, r in nodes.items() if s != "site_a"}
        truths = [fidelity_image(data / p) for s in others for p in others[s]["reference_path"]]
        central = TextureMatching(**PARAMS).fit(
            model_space_images_with_masks(df, TextureMatching().policy, False), "site_a")
        reference = outputs_by_site({s: central for s in others}, others)
        flat = [y for s in others for y in reference[s]]
        rows.append(_row(n, "central", flat, truths, flat, 0.0))
        for eps in (float(v) for v in args.epsilons.split(",")):
            for k in range(args.repeats):
                started = time.perf_counter()
                cfg = FederatedConfig(task="texture", reference_site="site_a", manifest=manifest,
                                      rounds=1, out=out / f"fed_{n}_{eps:g}_{k}", texture=PARAMS,
                                      privacy={"mode": "patient-dp", "epsilon": eps,
                                               "delta": 1e-5})
                task = TextureTask(cfg)
                release, _, _ = task.train({}, None, nodes["site_a"], {})
                models = {s: load_translator(task.finish(release, r)) for s, r in others.items()}
                private = outputs_by_site(models, others)
                rows.append(_row(n, f"patient-dp eps {eps:g}",
                                 [y for s in others for y in private[s]], truths, flat,
                                 time.perf_counter() - started, k))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "texture_dp.csv", index=False, float_format="%.4f")
    summary = table.groupby(["per_site", "method"], sort=False)[
        ["ssim", "diff_to_central"]].mean()
    print(summary.round(4).to_string())
    return 0


def _row(n: int, method: str, outputs, truths, central, seconds: float, repeat: int = 0
         ) -> dict:
    scores = score_images(outputs, truths)
    stats = mean_ci(scores["ssim"])
    return {"per_site": n, "method": method, "repeat": repeat, "ssim": stats["mean"],
            "ssim_lo": stats["ci95"][0], "ssim_hi": stats["ci95"][1],
            "diff_to_central": float(np.mean([np.abs(a - b).mean()
                                              for a, b in zip(outputs, central, strict=True)])),
            "seconds": seconds}


if __name__ == "__main__":
    raise SystemExit(main())
