"""CycleGAN training speed at the reference architecture: bf16 autocast vs fp32 step
time (target: at most 0.55x), and loss curves of the first few hundred steps of both.

1. Step time: `train_cyclegan` with configs/cyclegan/default.yaml (ngf 64, 9 blocks,
   70x70 PatchGAN) on whole 256 px synthetic images, batch 1, for each
   `train.mixed_precision`; seconds per step from the training log, the first (warm-up)
   step left out.
2. Loss curves: the same architecture and code trained on 64 px crops (cheaper; the
   arithmetic is the same kind) for --curve-steps steps at constant lr, fp32 with two
   seeds and bf16 with the first. "Within noise" when, for every loss, the bf16 curve is
   no further from fp32 (seed 0) than fp32 with another seed is (ratio <= 1.5 on the
   mean absolute difference of the logged curves after the first 50 steps).

    python eval/bench/bench_train_cyclegan.py --out eval_out/bench
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eval/bench/bench_diffusion.py

import argparse
from pathlib import Path

import pandas as pd

from harmonize.evaluation.bench_support import (
    ROOT,
    machine,
    step_seconds,
    train_cyclegan_log,
    verdict,
    write_json,
)
from harmonize.synth import generate
from harmonize.translators.cyclegan import load_config

CURVE_LOSSES = ("G_gan", "F_gan", "cycle", "idt", "D_B", "D_A")


def curve_distance(a: pd.DataFrame, b: pd.DataFrame, loss: str, skip: int) -> float:
    a, b = a[a["step"] > skip].set_index("step")[loss], b[b["step"] > skip].set_index("step")[loss]
    return float((a - b).abs().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("eval_out/bench"))
    p.add_argument("--timed-steps", type=int, default=7, help="steps per precision at 256 px")
    p.add_argument("--curve-steps", type=int, default=300, help="0: time the steps only")
    args = p.parse_args(argv)
    work = args.out / "train_cyclegan"
    config = load_config(ROOT / "configs/cyclegan/default.yaml")
    generate(work / "data256", sites=2, per_site=8, size=256, seed=0, progress=False)
    generate(work / "data128", sites=2, per_site=40, size=128, seed=0, progress=False)

    timing = {}
    for precision in ("no", "bf16"):
        log = train_cyclegan_log(config, work / "data256", work / f"time_{precision}",
                                 steps=args.timed_steps, precision=precision, seed=0, crop=256,
                                 load_size=None, log_every=1)
        timing[precision] = step_seconds(log)
        print(f"256 px step, mixed_precision={precision}: {timing[precision]:.2f} s")
    ratio = timing["bf16"] / timing["no"]
    result = {
        "config": "configs/cyclegan/default.yaml (ngf 64, 9 blocks, ndf 64, 3 D layers)",
        "step_timing": {"image_px": 256, "batch": 1, "timed_steps": args.timed_steps - 1,
                        "seconds_fp32": timing["no"], "seconds_bf16": timing["bf16"],
                        "bf16_over_fp32": ratio},
        "machine": machine(),
    }
    print(f"\nbf16 / fp32 step time at 256 px: {ratio:.3f} {verdict(ratio, 0.55, at_most=True)}")
    if args.curve_steps:
        result.update(loss_curves(config, work, args.out, args.curve_steps))
    write_json(args.out / ("train_cyclegan.json" if args.curve_steps else
                           "train_cyclegan_timing.json"), result)
    return 0


def loss_curves(config, work: Path, out: Path, steps: int) -> dict:
    curves = {}
    for name, precision, seed in (("fp32_seed0", "no", 0), ("fp32_seed1", "no", 1),
                                  ("bf16_seed0", "bf16", 0)):
        curves[name] = train_cyclegan_log(config, work / "data128", work / f"curve_{name}",
                                          steps=steps, precision=precision, seed=seed, crop=64,
                                          load_size=None, log_every=10)
        print(f"curve {name}: {step_seconds(curves[name]):.2f} s/step at 64 px")
    table = pd.concat([c.assign(run=name) for name, c in curves.items()])
    table.to_csv(out / "train_cyclegan_curves.csv", index=False)
    skip = 50
    noise = {}
    for loss in CURVE_LOSSES:
        d_bf16 = curve_distance(curves["bf16_seed0"], curves["fp32_seed0"], loss, skip)
        d_seed = curve_distance(curves["fp32_seed1"], curves["fp32_seed0"], loss, skip)
        noise[loss] = {"bf16_vs_fp32": d_bf16, "seed1_vs_seed0": d_seed,
                       "ratio": d_bf16 / d_seed if d_seed else float("inf")}
    within = all(v["ratio"] <= 1.5 for v in noise.values())
    for loss, v in noise.items():
        print(f"  {loss:>6}: |bf16 - fp32| {v['bf16_vs_fp32']:.4f}, |seed1 - seed0| "
              f"{v['seed1_vs_seed0']:.4f} (ratio {v['ratio']:.2f})")
    print(f"loss curves within noise: {within}")
    return {"curves": {"image_px": 64, "steps": steps, "lr": "constant 2e-4",
                       "compared_after_step": skip, "per_loss": noise, "within_noise": within,
                       "bf16_seconds_per_step_64px": step_seconds(curves["bf16_seed0"]),
                       "fp32_seconds_per_step_64px": step_seconds(curves["fp32_seed0"])},
            "bf16_model": str(work / "curve_bf16_seed0" / "model")}


if __name__ == "__main__":
    raise SystemExit(main())
