"""Shared by the eval/bench scripts: machine facts, fitted growth slopes, result files.

Every script prints its ratios with the configuration used and writes OUT/<name>.json
(and CSVs for curves), which `eval/bench/report.py` turns into the plots of
docs/performance.md.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

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
