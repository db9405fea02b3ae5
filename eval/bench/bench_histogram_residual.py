"""Speed of the histogram-residual translator, against the CycleGAN quick config in the
same run (the machines are noisy: ratios), and apply at femur X-ray size.

1. Training: seconds per step of configs/histogram_residual/quick.yaml and
   configs/cyclegan/quick.yaml on the same synthetic data (3 sites x 24 at 128 px),
   alternating A B A B so drift hits both; the first 10 steps of each are warm-up.
2. Apply: seconds per 2048 x 2048 image of the quick and the default config's translator
   (untrained weights: the arithmetic is the same), and whether 4,300 images fit in 8 hours
   on this machine.

    python eval/bench/bench_histogram_residual.py --out eval_out/bench
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eval/bench/bench_diffusion.py

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.evaluation.bench_support import ROOT, machine, write_json
from harmonize.synth import generate
from harmonize.translators import HistogramMatching, HistogramResidualTranslator
from harmonize.translators.cyclegan import load_config, train_cyclegan
from harmonize.translators.cyclegan.networks import init_weights

CONFIGS = {"histogram-residual": ROOT / "configs/histogram_residual/quick.yaml",
           "cyclegan": ROOT / "configs/cyclegan/quick.yaml"}
COHORT, NIGHT_S = 4300, 8 * 3600


def step_seconds(name: str, data: Path, out: Path, steps: int) -> float:
    run = out / f"run_{name}"
    shutil.rmtree(run, ignore_errors=True)
    config = load_config(CONFIGS[name], {
        "data.manifest": str(data / "manifest.csv"), "data.reference_site": "site_a",
        "train.out": str(run), "train.steps": steps, "train.log_every": 1,
        "train.sample_every": 10**6, "train.checkpoint_every": 10**6,
        "train.snapshot_every": None, "train.select_fraction": 0.0, "train.progress": False})
    train_cyclegan(config)
    log = pd.read_csv(run / "train_log.csv")
    seconds = log["seconds"].to_numpy()
    return float((seconds[-1] - seconds[9]) / (len(seconds) - 10))


def apply_seconds(config_path: Path, side: int, repeats: int) -> float:
    c = load_config(config_path)
    m = c.model
    t = HistogramResidualTranslator(ngf=m.ngf, n_blocks=m.n_blocks, tile_size=c.data.image_size,
                                    tile_overlap=c.inference.tile_overlap,
                                    batch_size=c.inference.batch_size,
                                    fingerprints=c.data.fingerprints)
    rng = np.random.default_rng(0)
    image = rng.random((side, side), dtype=np.float32)
    hm = HistogramMatching().fit([(image, "site_a")], "site_a")
    g = init_weights(t.build_generator())
    for p in g.parameters():  # nonzero weights everywhere, as after training
        p.data.normal_(0, 0.02)
    t.set_trained(g, hm.template_, "site_a", hm)
    t.transform([image[:256, :256]], ["site_b"])  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        t.transform([image], ["site_b"])
    return (time.perf_counter() - started) / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/bench")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--side", type=int, default=2048)
    args = p.parse_args(argv)
    out = Path(args.out) / "histogram_residual"
    data = out / "synth"
    if not (data / "manifest.csv").exists():
        generate(data, sites=3, per_site=24, size=128, seed=0, progress=False)
    times: dict[str, list[float]] = {n: [] for n in CONFIGS}
    for _ in range(2):
        for name in CONFIGS:
            times[name].append(step_seconds(name, data, out, args.steps))
    hr, cg = np.mean(times["histogram-residual"]), np.mean(times["cyclegan"])
    applies = {name: apply_seconds(ROOT / f"configs/histogram_residual/{name}.yaml", args.side,
                                   2 if name == "quick" else 1)
               for name in ("quick", "default")}
    result = {
        "machine": machine(),
        "train_step_s": {k: [round(v, 4) for v in vs] for k, vs in times.items()},
        "train_step_ratio_hr_over_cyclegan": round(float(hr / cg), 3),
        "apply_side": args.side,
        "apply_s_per_image": {k: round(v, 2) for k, v in applies.items()},
        "cohort_hours": {k: round(v * COHORT / 3600, 1) for k, v in applies.items()},
        "fits_one_night": {k: bool(v * COHORT <= NIGHT_S) for k, v in applies.items()},
    }
    write_json(out / "bench_histogram_residual.json", result)
    print(f"train step: histogram-residual {hr:.3f} s, cyclegan quick {cg:.3f} s "
          f"(ratio {hr / cg:.2f}); apply at {args.side}^2: "
          + ", ".join(f"{k} {v:.1f} s/image ({v * COHORT / 3600:.1f} h for {COHORT})"
                      for k, v in applies.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
