"""Speed of the diffusion translator on this machine: training steps/s (one prior for
SDEdit, one per site for DDIB) and translation seconds per image versus DDIM steps.

Trains the given config (default quick) for a few steps on a small synthetic set, times
the steps from the training log (set-up excluded), then times `transform` on a batch of
full-size images for SDEdit and DDIB at 5/10/20/50 DDIM steps, fp32 and bf16.

    python eval/bench/bench_diffusion.py --out eval_out/bench_diffusion

Writes OUT/bench.json and prints a table.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall each other 10-30x when the cores are shared
# (measured here: a 2-thread training step went from 0.26 s to 20 s next to another job);
# passive waiting costs nothing measurable alone. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.data.manifest import load_manifest
from harmonize.translators import TRANSLATORS, load_translator
from harmonize.translators.diffusion import DiffusionTranslator, load_config, train_diffusion
from harmonize.translators.diffusion.config import parse_override

ROOT = Path(__file__).resolve().parents[2]
TRANSLATORS.setdefault("diffusion", DiffusionTranslator)  # until the registry line lands
STEPS = (5, 10, 20, 50)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/bench_diffusion")
    p.add_argument("--config", default=str(ROOT / "configs/diffusion/quick.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--images", type=int, default=16, help="images per translation timing")
    p.add_argument("--size", type=int, default=128, help="synthetic image side")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print_table(result)
    return 0


def run(args: argparse.Namespace) -> dict:
    from harmonize.synth import generate

    out = Path(args.out)
    info = generate(out / "synth", sites=4, per_site=max(args.images, 16), size=args.size,
                    seed=0, progress=False)
    ref = info["reference_site"]
    manifest = out / "synth" / "manifest.csv"
    overrides = dict(parse_override(s) for s in args.overrides)
    training = {}
    for mode in ("sdedit", "ddib"):
        run_dir = out / f"train_{mode}"
        config = load_config(args.config, {
            **overrides, "data.manifest": str(manifest), "data.reference_site": ref,
            "inference.mode": mode, "train.out": str(run_dir), "train.steps": args.train_steps,
            "train.log_every": 5, "train.sample_every": 10**9,
            "train.checkpoint_every": 10**9, "train.progress": False})
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        model_dir = train_diffusion(config)
        log = [(int(r["step"]), float(r["seconds"]))
               for r in csv.DictReader(open(run_dir / "train_log.csv"))]
        # median over the logged intervals: robust to a warm-up step or a busy neighbour
        rate = float(np.median([(s1 - s0) / (t1 - t0) for (s0, t0), (s1, t1)
                                in zip(log[:-1], log[1:], strict=True)]))
        n_models = len(json.loads((model_dir / "metadata.json").read_text())["model_sites"])
        training[mode] = {"models": n_models, "batch_size": config.train.batch_size,
                          "image_size": config.data.image_size,
                          "mixed_precision": config.train.mixed_precision,
                          "steps_per_s": rate, "model_steps_per_s": n_models * rate}
    translator = load_translator(out / "train_ddib" / "model")
    df = load_manifest(manifest)
    df = df[df["site"] != ref].head(args.images)
    policy = IntensityPolicy()
    images = [policy.to_model(read_image(p))[0] for p in df["path"]]
    sites = list(df["site"])
    translation = []
    for precision in ("fp32", "bf16"):
        for mode in ("sdedit", "ddib"):
            for steps in STEPS:
                translator.set_params(mode=mode, steps=steps, precision=precision,
                                      batch_size=len(images))
                translator.transform(images[:2], sites[:2])  # warm-up
                start = time.perf_counter()
                translator.transform(images, sites)
                seconds = (time.perf_counter() - start) / len(images)
                calls = max(1, int(steps * (translator.sdedit_t0 if mode == "sdedit" else
                                            translator.ddib_t0) + 1e-6))
                if mode == "ddib":
                    calls *= 2 + translator.inversion_refine
                translation.append({"precision": precision, "mode": mode, "steps": steps,
                                    "unet_calls": calls, "s_per_image": seconds})
    result = {"cpu_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
              "image_px": args.size, "images": len(images), "training": training,
              "translation": translation,
              "inference": {"sdedit_t0": translator.sdedit_t0, "ddib_t0": translator.ddib_t0,
                            "inversion_refine": translator.inversion_refine,
                            "model_size": translator.image_size}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_table(result: dict) -> None:
    print(f"\n{result['cpu_threads']} CPU thread(s), cuda={result['cuda']}")
    for mode, r in result["training"].items():
        print(f"training {mode}: {r['models']} model(s), batch {r['batch_size']} at "
              f"{r['image_size']} px, {r['mixed_precision']}: {r['steps_per_s']:.2f} steps/s "
              f"({r['model_steps_per_s']:.2f} model-steps/s)")
    inf = result["inference"]
    print(f"translation of {result['images']} {result['image_px']} px images at "
          f"{inf['model_size']} px (SDEdit t0={inf['sdedit_t0']}, DDIB t0={inf['ddib_t0']}, "
          f"refine={inf['inversion_refine']}): seconds per image")
    print(f"{'precision':10} {'mode':8} " + " ".join(f"{s:>9}" for s in STEPS))
    rows: dict = {}
    for r in result["translation"]:
        rows.setdefault((r["precision"], r["mode"]), {})[r["steps"]] = r["s_per_image"]
    for (precision, mode), by_steps in rows.items():
        print(f"{precision:10} {mode:8} " + " ".join(f"{by_steps[s]:9.3f}" for s in STEPS))


if __name__ == "__main__":
    raise SystemExit(main())
