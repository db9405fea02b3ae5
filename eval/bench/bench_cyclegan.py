"""How fast is CycleGAN here? Training steps/s, apply images/s at 256 px, FLOPs per image.

For each architecture (quick: configs/cyclegan/quick.yaml, default: the reference one):
- training steps/s: `train_cyclegan` on a synthetic 256 px set (batch 1, timed from the
  training log, start-up excluded);
- generator forward images/s on 256 px batches (inference mode), fp32 and bf16 autocast;
- apply images/s end to end: 16-bit PNG files in, `apply_translator` (read, intensity
  policy, polarity check, tiling, write) out, and its share of the forward throughput;
- FLOPs of one forward pass (torch.utils.flop_counter; a multiply-add counts 2), per
  256 px image and per image as apply runs it (tiles when the training size is smaller);
- SSIM between bf16 and fp32 outputs (of a trained checkpoint when --model is given).

    python eval/bench/bench_cyclegan.py --out eval_out/bench_cyclegan [--model RUN/model]
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting stall each other 10-30x when the cores are shared;
# passive waiting costs nothing measurable alone. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from harmonize.apply import apply_translator
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.evaluation.bench_support import (
    ROOT,
    forward_speed,
    step_seconds,
    train_cyclegan_log,
)
from harmonize.metrics import ssim
from harmonize.synth import generate
from harmonize.translators import IdentityTranslator, load_translator
from harmonize.translators.cyclegan import CycleGANTranslator, load_config
from harmonize.translators.cyclegan.networks import ResnetGenerator
from harmonize.translators.tiling import tile_starts

SIZE = 256


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/bench_cyclegan")
    p.add_argument("--arch", nargs="+", default=["quick", "default"])
    p.add_argument("--images", type=int, default=16, help="images for apply / forward")
    p.add_argument("--train-steps", type=int, nargs="+", default=[20, 3],
                   help="timed training steps per arch (0: skip)")
    p.add_argument("--model", default=None, help="trained checkpoint for the bf16 SSIM")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    data = out / "synth"
    generate(data, sites=2, per_site=max(args.images, 8), size=SIZE, seed=0, progress=False)
    results = {"threads": torch.get_num_threads(), "image_size": SIZE, "arch": {},
               "apply_io_only_img_per_s": io_speed(data, out / "io", args.images)}
    for arch, steps in zip(args.arch, args.train_steps + [0] * len(args.arch), strict=False):
        config = load_config(ROOT / "configs/cyclegan" / f"{arch}.yaml")
        results["arch"][arch] = bench_arch(config, data, out / arch, args.images, steps)
    if args.model:
        results["bf16_vs_fp32"] = bf16_agreement(load_translator(args.model), data)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print_results(results)
    return 0


def bench_arch(config, data: Path, out: Path, n_images: int, train_steps: int) -> dict:
    m = config.model
    res: dict = {"ngf": m.ngf, "n_blocks": m.n_blocks, "train_tile": config.data.image_size}
    if train_steps:
        res["train_steps_per_s"] = train_speed(config, data, out / "run", train_steps)
    g = ResnetGenerator(ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample,
                        residual=m.residual).eval()
    res["gflops_256px"] = flops(g, SIZE) / 1e9
    batch = config.inference.batch_size
    for precision in ("fp32", "bf16"):
        res[f"forward_img_per_s_{precision}"] = forward_speed(g, n_images, batch, precision)
    res["apply"] = {}
    for tile in sorted({min(config.data.image_size, SIZE), SIZE}):
        overlap = config.inference.tile_overlap
        n_tiles = len(tile_starts(SIZE, tile, round(overlap * tile))) ** 2
        entry: dict = {"tiles_per_image": n_tiles,
                       "gflops_per_image": flops(g, tile) * n_tiles / 1e9}
        for precision in ("fp32", "bf16"):
            translator = CycleGANTranslator(
                ngf=m.ngf, n_blocks=m.n_blocks, upsample=m.upsample, residual=m.residual,
                tile_size=tile, tile_overlap=overlap, batch_size=batch,
                precision=precision).set_trained(g, np.ones((32, 32), np.float32), "site_a")
            speed = apply_speed(translator, data, out / "apply", n_images)
            entry[f"img_per_s_{precision}"] = speed
            entry[f"share_of_forward_{precision}"] = speed / res[f"forward_img_per_s_{precision}"]
        res["apply"][f"tile_{tile}"] = entry
    return res


def io_speed(data: Path, out: Path, n: int) -> float:
    """apply with the identity translator: reading, intensity policy and writing alone."""
    return apply_speed(IdentityTranslator(), data, out, n)


def train_speed(config, data: Path, out: Path, steps: int) -> float:
    """Steps/s of `train_cyclegan` on whole 256 px images, batch 1, the config's precision."""
    log = train_cyclegan_log(config, data, out, steps=steps,
                             precision=config.train.mixed_precision, seed=0, crop=SIZE,
                             load_size=None, log_every=1)
    return 1.0 / step_seconds(log)


def flops(g: torch.nn.Module, side: int) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        g(torch.zeros(1, 1, side, side))
    return counter.get_total_flops()


def apply_speed(translator, data: Path, out: Path, n: int) -> float:
    """End to end over n 256 px 12-bit PNG files of one site (files in, files out)."""
    shutil.rmtree(out, ignore_errors=True)
    folder = out.parent / "apply_input"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for path in sorted((data / "site_b").rglob("*.png"))[:n]:
            shutil.copy(path, folder / path.name)
    translator.transform([np.zeros((SIZE, SIZE), np.float32)])  # warm-up
    started = time.perf_counter()
    summary = apply_translator(translator, folder, out, batch_size=getattr(
        translator, "batch_size", 8), progress=False)
    seconds = time.perf_counter() - started
    return (summary.ok / seconds) if summary.ok else float("nan")


def bf16_agreement(translator, data: Path) -> dict:
    """SSIM / max difference between bf16 and fp32 translations of real-looking images."""
    policy = IntensityPolicy()
    paths = sorted((data / "site_b").rglob("*.png"))[:8]
    images = [policy.to_model(read_image(p))[0] for p in paths]
    translator.precision = "fp32"
    fp32 = translator.transform(images)
    translator.precision = "bf16"
    bf16 = translator.transform(images)
    scores = [ssim(a, b) for a, b in zip(fp32, bf16, strict=True)]
    diffs = [float(np.abs(a - b).max()) for a, b in zip(fp32, bf16, strict=True)]
    return {"n": len(scores), "ssim_mean": float(np.mean(scores)),
            "ssim_min": float(np.min(scores)), "max_abs_diff": float(np.max(diffs))}


def print_results(results: dict) -> None:
    print(f"\nCycleGAN speed at {SIZE} px on {results['threads']} CPU thread(s); apply with "
          f"the identity translator (I/O only): {results['apply_io_only_img_per_s']:.1f} img/s")
    for arch, r in results["arch"].items():
        print(f"[{arch}] ngf {r['ngf']}, {r['n_blocks']} blocks: {r['gflops_256px']:.1f} GFLOP "
              f"per {SIZE} px forward")
        if "train_steps_per_s" in r:
            print(f"  training on whole {SIZE} px images, batch 1, fp32: "
                  f"{r['train_steps_per_s']:.3f} steps/s")
        print(f"  generator forward: {r['forward_img_per_s_fp32']:.2f} img/s fp32, "
              f"{r['forward_img_per_s_bf16']:.2f} img/s bf16 "
              f"({r['forward_img_per_s_bf16'] / r['forward_img_per_s_fp32']:.2f}x)")
        for name, e in r["apply"].items():
            print(f"  apply, {name} ({e['tiles_per_image']} tile(s), "
                  f"{e['gflops_per_image']:.1f} GFLOP/img): " + ", ".join(
                      f"{p} {e[f'img_per_s_{p}']:.2f} img/s = "
                      f"{100 * e[f'share_of_forward_{p}']:.0f}% of forward"
                      for p in ("fp32", "bf16")))
    if "bf16_vs_fp32" in results:
        b = results["bf16_vs_fp32"]
        print(f"bf16 vs fp32 outputs: SSIM mean {b['ssim_mean']:.4f} (min {b['ssim_min']:.4f}),"
              f" max |diff| {b['max_abs_diff']:.4f} over {b['n']} images")


if __name__ == "__main__":
    raise SystemExit(main())
