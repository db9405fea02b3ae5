"""Shared by the eval/bench scripts: machine facts, fitted growth slopes, result files,
and the CycleGAN timing pieces several of them use.

Every script prints its ratios with the configuration used and writes OUT/<name>.json
(and CSVs for curves), which `eval/bench/report.py` turns into the plots of
docs/performance.md.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

# the repository root (configs/, eval/), as harmonize/demo.py finds configs/ (editable install)
ROOT = Path(__file__).resolve().parents[2]


def machine() -> dict:
    """What the numbers were measured on (the machines are noisy: ratios, not absolutes)."""
    import torch

    from harmonize.training.device import cpu_kind, native_bf16

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpus": cpus,
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": native_bf16("cpu"),
        "cpu_kind": cpu_kind(),  # docs/performance.md: which CPU a figure comes from
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def loglog_slope(x, y) -> float:
    """Exponent b of y ~ a * x**b, least squares in log-log (1: linear growth)."""
    b, _ = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(b)


def linear_fit(x, y) -> tuple[float, float]:
    """(slope, intercept) of y = slope * x + intercept, least squares."""
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(slope), float(intercept)


def write_json(path: Path, result: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


def verdict(value: float, target: float, at_most: bool = False) -> str:
    ok = value <= target if at_most else value >= target
    return f"{'met' if ok else 'MISSED'} (target {'<=' if at_most else '>='} {target:g})"


# --- CycleGAN timing (bench_train_cyclegan, bench_cyclegan, bench_apply) ----------------------


def train_cyclegan_log(config, data: Path, out: Path, *, steps: int, precision: str,
                       seed: int, crop: int, load_size: int | None,
                       log_every: int) -> pd.DataFrame:
    """Train `config` afresh in OUT on DATA/manifest.csv (reference site site_a, batch 1,
    constant lr, no samples or checkpoints on the way) and return its training log."""
    from harmonize.translators.cyclegan import train_cyclegan

    shutil.rmtree(out, ignore_errors=True)
    config = config.model_copy(deep=True)
    config.data.manifest = data / "manifest.csv"
    config.data.reference_site = "site_a"
    config.data.load_size = load_size
    config.data.image_size = crop
    config.data.num_workers = 0
    t = config.train
    t.out, t.steps, t.decay_steps, t.batch_size, t.seed = out, steps, 0, 1, seed
    t.mixed_precision = precision
    t.log_every = log_every
    t.sample_every = t.checkpoint_every = 10**9
    t.progress = False
    train_cyclegan(config)
    return pd.read_csv(out / "train_log.csv")


def step_seconds(log: pd.DataFrame) -> float:
    """Median seconds per step between log rows (the first row, with the warm-up, is
    only a start; the median shrugs off a step slowed by a busy neighbour)."""
    return float((log["seconds"].diff() / log["step"].diff()).dropna().median())


def forward_speed(g, n: int, batch: int, precision: str, size: int = 256) -> float:
    """Images/s of generator `g`'s forward pass on n size x size images in batches
    (inference mode, CPU; precision "bf16": autocast), after one warm-up batch."""
    import torch

    x = torch.rand(batch, 1, size, size) * 2 - 1
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                enabled=precision == "bf16"):
        g(x)  # warm-up (the kernels for this batch shape)
        started = time.perf_counter()
        done = 0
        while done < n:
            g(x[: min(batch, n - done)])
            done += min(batch, n - done)
    return n / (time.perf_counter() - started)
