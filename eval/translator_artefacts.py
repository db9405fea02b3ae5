"""Why do the generative translators add texture to real X-rays, and what removes it?

On the real two-site chest X-rays (../shared/data/tb_cxr_2site), Montgomery -> Shenzhen:
trains CycleGAN variants (the candidates of issue 18: a residual generator, stronger
identity / structure weights, whole images at native resolution, more steps with
snapshots chosen without labels) and tries DDIB inference variants on one pair of
priors, then scores every translation of all Montgomery images with the unlabelled
measures of `harmonize.evaluation.artefacts` against Shenzhen's own images:
texture_excess (added high-frequency power), spectrum / intensity distance to Shenzhen,
structure kept, and the selection score. Identity and histogram matching are the
baselines.

    python eval/translator_artefacts.py --out eval_out/artefacts        # ~30 min, 2 cores
    python eval/translator_artefacts.py --only cyclegan-baseline --out /tmp/a

Writes OUT/artefacts.csv (one row per translator, variant and checkpoint), OUT/selected.json
(the best checkpoint per variant by selection score), OUT/grid.png (the same patients,
whole image and a lung crop, per translator) and prints the table.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eval/cyclegan_fidelity.py

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.data.manifest import load_manifest
from harmonize.evaluation.artefacts import artefact_scores, selection_score

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT.parent / "shared/data/tb_cxr_2site/manifest.csv"
REFERENCE, SOURCE = "shenzhen", "montgomery"

# name -> (config, overrides); every CycleGAN-family variant keeps snapshots for selection
QUICK = "configs/cyclegan/quick.yaml"
CYCLEGAN = {
    "cyclegan-baseline": (QUICK, {}),  # configs/cyclegan/quick.yaml as the study ran it
    "cyclegan-residual-long": (QUICK, {"model.residual": True, "train.steps": 1200}),
    # the residual generator stayed at the identity (structure 0.999, intensities
    # unmoved): free it of the identity and structure terms, which pull it there
    "cyclegan-residual-free": (QUICK, {"model.residual": True, "loss.lambda_identity": 0.0,
                                       "loss.lambda_structure": 0.0}),
    # issue 26's translator: fingerprints removed, histogram matching (per-image
    # landmarks), then a residual generator; its step 0 is the first two stages alone
    "histogram-residual": ("configs/histogram_residual/quick.yaml", {}),
}
# DDIB inference settings tried on one trained pair of priors
DDIB = {
    "ddib-baseline": {},  # ddib_t0 1.0, large_images residual
    "ddib-resize": {"large_images": "resize"},
    "ddib-t0.6": {"ddib_t0": 0.6},
    "ddib-t0.6-resize": {"ddib_t0": 0.6, "large_images": "resize"},
}


def load_site(df: pd.DataFrame, site: str) -> tuple[pd.DataFrame, list[np.ndarray]]:
    policy = IntensityPolicy()
    rows = df[df["site"] == site].reset_index(drop=True)
    return rows, [np.clip(policy.to_model(read_image(p))[0], 0, 1).astype(np.float32)
                  for p in rows["path"]]


def translate(translator, images: list[np.ndarray], batch: int = 16) -> list[np.ndarray]:
    out = []
    for k in range(0, len(images), batch):
        out += translator.transform(images[k:k + batch], [SOURCE] * len(images[k:k + batch]))
    return [np.clip(o, 0, 1) for o in out]


def lung_masks(rows: pd.DataFrame) -> list[np.ndarray]:
    """The manifest's lung masks (relative to it) of `rows`: where structure_in_mask
    looks, the anatomy no fingerprint removal may touch."""
    return [np.asarray(read_image(MANIFEST.parent / m).array).squeeze() > 0
            for m in rows["lung_mask"]]


def score(name: str, variant: str, step: int, sources, outputs, references, seconds,
          masks) -> dict:
    s = artefact_scores(sources, outputs, references, masks)
    return {"translator": name, "variant": variant, "step": step, **s,
            "selection_score": selection_score(s), "apply_s": seconds}


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    snaps = sorted((run / "snapshots").glob("step_*"))
    return [(int(p.name.split("_")[1]), p) for p in snaps]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/artefacts")
    p.add_argument("--only", nargs="*", default=None, help="variant names to run")
    p.add_argument("--snapshot-every", type=int, default=300)
    p.add_argument("--references", type=int, default=200, help="Shenzhen images scored")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from harmonize.fit import fit_and_save
    from harmonize.translators import HistogramMatching, load_translator
    from harmonize.translators.cyclegan import load_config, train_cyclegan

    df = load_manifest(MANIFEST)
    src_rows, sources = load_site(df, SOURCE)
    masks = lung_masks(src_rows)
    _, refs = load_site(df, REFERENCE)
    refs = refs[:: max(1, len(refs) // args.references)][: args.references]
    wanted = set(args.only) if args.only else None
    rows, outputs = [], {"raw": sources}
    rows.append(score("identity", "identity", 0, sources, sources, refs, 0.0, masks))

    t = time.perf_counter()
    hm = load_translator(fit_and_save(HistogramMatching(), df, MANIFEST, REFERENCE,
                                      out / "histogram-matching", progress=False))
    outputs["histogram-matching"] = translate(hm, sources)
    rows.append(score("histogram-matching", "histogram-matching", 0, sources,
                      outputs["histogram-matching"], refs, time.perf_counter() - t, masks))

    timings = {}
    for variant, (config_path, overrides) in CYCLEGAN.items():
        if wanted and variant not in wanted:
            continue
        run = out / variant
        config = load_config(ROOT / config_path, {
            "data.manifest": str(MANIFEST), "data.reference_site": REFERENCE,
            "train.out": str(run), "train.snapshot_every": args.snapshot_every,
            "train.progress": False, **overrides})
        if not (run / "model" / "model.safetensors").is_file():
            t = time.perf_counter()
            train_cyclegan(config)
            timings[variant] = time.perf_counter() - t
            print(f"{variant}: trained in {timings[variant]:.0f} s", flush=True)
        cached = run / "scores.json"  # a rerun scores only what is new
        if cached.is_file():
            rows += json.loads(cached.read_text())
            step, path = checkpoints(run)[-1]
            outputs[f"{variant}@{step}"] = translate(load_translator(path), sources)
            continue
        for step, path in checkpoints(run):
            t = time.perf_counter()
            translated = translate(load_translator(path), sources)
            rows.append(score(config.kind, variant, step, sources, translated, refs,
                              time.perf_counter() - t, masks))
            outputs[f"{variant}@{step}"] = translated
            print(rows[-1], flush=True)
        cached.write_text(json.dumps([r for r in rows if r["variant"] == variant]))

    ddib_variants = [v for v in DDIB if not wanted or v in wanted]
    if ddib_variants:
        from harmonize.translators.diffusion import load_config as load_diffusion
        from harmonize.translators.diffusion import train_diffusion

        run = out / "ddib"
        if not (run / "model" / "model.safetensors").is_file():
            t = time.perf_counter()
            train_diffusion(load_diffusion(ROOT / "configs/diffusion/quick.yaml", {
                "data.manifest": str(MANIFEST), "data.reference_site": REFERENCE,
                "train.out": str(run), "train.progress": False, "inference.mode": "ddib"}))
            timings["ddib"] = time.perf_counter() - t
        for variant in ddib_variants:
            translator = load_translator(run / "model").set_params(**DDIB[variant])
            t = time.perf_counter()
            translated = translate(translator, sources)
            rows.append(score("ddib", variant, 500, sources, translated, refs,
                              time.perf_counter() - t, masks))
            outputs[variant] = translated
            print(rows[-1], flush=True)

    table = pd.DataFrame(rows)
    table.to_csv(out / "artefacts.csv", index=False)
    best = (table.loc[table.groupby("variant")["selection_score"].idxmin()]
            .set_index("variant")["step"].astype(int).to_dict())
    (out / "selected.json").write_text(json.dumps({"selected_step": best,
                                                   "train_s": timings}, indent=2))
    grid(out, src_rows, outputs, table)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.round(4).to_string(index=False))
    return 0


def grid(out: Path, rows: pd.DataFrame, outputs: dict, table: pd.DataFrame) -> Path:
    """OUT/grid.png: one normal and one TB patient, raw and per translation (the final
    checkpoint of each variant), whole image and a 96 px crop of the right lung."""
    import matplotlib.pyplot as plt

    from harmonize.report.html import image_grid

    picks = [int(rows.index[rows["label"] == lab][0]) for lab in sorted(rows["label"].unique())]
    last = table.groupby("variant")["step"].max().to_dict()
    columns = ["raw", "histogram-matching"] + [
        k for k in outputs if "@" in k and int(k.split("@")[1]) == last[k.split("@")[0]]
    ] + [k for k in outputs if k.startswith("ddib")]
    cells, titles = [], []
    for i in picks:
        crop = (slice(70, 166), slice(40, 136))
        cells.append([outputs[c][i] for c in columns])
        cells.append([outputs[c][i][crop] for c in columns])
        name = f"{rows.loc[i, 'patient_id']} ({rows.loc[i, 'label']})"
        titles += [name, "lung crop"]
    fig = image_grid(cells, [c.replace("cyclegan-", "cg-") for c in columns], titles,
                     cell_inches=1.9)
    fig.savefig(out / "grid.png", dpi=72)
    plt.close(fig)
    return out / "grid.png"


if __name__ == "__main__":
    raise SystemExit(main())
