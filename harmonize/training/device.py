"""The one device and precision policy of every training and inference path.

- `pick_device`: where a model runs ("auto": this process's GPU under `accelerate
  launch` / torchrun / a Flower node with a GPU share, else the CPU).
- `resolve_precision` / `training_precision`: what "auto" precision means on a device:
  bf16 where the hardware runs it natively, fp32 elsewhere. CPUs without AVX-512 BF16
  emulate bf16 hundreds of times slower than fp32, so nothing forces bf16.
- `make_accelerator`: a fresh accelerate `Accelerator` per training.
- `loader_options`: DataLoader settings that keep a GPU fed (workers, pinned memory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from harmonize.training.process_exit import launched_processes

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 runs natively on `device`: a GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX. Elsewhere PyTorch emulates bf16, slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        try:  # private helpers, present since torch 2.1; absent means "do not assume"
            return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        except AttributeError:
            return False
    return False


def cpu_kind() -> str:
    """The CPU's bf16 capability in words, for reports next to every speed figure."""
    if native_bf16("cpu"):
        return "CPU with native bf16 (AVX-512 BF16 / AMX)"
    try:
        avx512 = bool(torch.cpu._is_avx512_supported())
    except AttributeError:
        avx512 = False
    return "CPU with AVX-512, no bf16" if avx512 else "CPU without AVX-512"


def pick_device(setting: str = "auto") -> torch.device:
    """'auto': this process's GPU when there is one (LOCAL_RANK picks it under
    `accelerate launch` / torchrun), else the CPU; any other value as given."""
    if setting != "auto":
        return torch.device(setting)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' -> 'bf16' where it runs natively (measured: 1.8x fp32 for the CycleGAN
    generator on a 2-core AVX-512 BF16 CPU, SSIM to the fp32 output > 0.995, see
    docs/performance.md), else 'fp32'; any other value is returned as given."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast(device: torch.device, precision: str):
    """torch.autocast on `device` for a precision setting: 'auto' (bf16 where native),
    'fp32' or accelerate's 'no' (disabled), 'bf16', 'fp16'."""
    dtype = DTYPES[resolve_precision({"no": "fp32"}.get(precision, precision), device)]
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def training_precision(setting: str, cpu_bf16: bool = True) -> str:
    """accelerate's mixed_precision for a training. 'auto' -> 'bf16' on a GPU that has
    it, and on a CPU that runs bf16 natively when `cpu_bf16` (networks measured to train
    like fp32 there: CycleGAN, docs/performance.md; the diffusion priors), else 'no'
    (fp32)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if native_bf16("cuda") else "no"
    return "bf16" if cpu_bf16 and native_bf16("cpu") else "no"


def make_accelerator(**kwargs) -> Accelerator:
    """A fresh Accelerator. accelerate keeps the first Accelerator's settings (mixed
    precision) process-wide and refuses different ones later, but an evaluation trains a
    CycleGAN, diffusion priors and classifiers in turn in one process, so the settings are
    reset first. The process group (PartialState) is kept: under `accelerate launch` every
    process still knows its rank.

    Launched as several processes on a machine without a GPU (`torchrun
    --nproc_per_node N`, `accelerate launch --num_processes N`), accelerate needs
    ``cpu=True`` to join them over gloo; otherwise each process trains alone
    (DistributedType.NO) and all of them write the same run folder."""
    AcceleratorState._reset_state()
    if launched_processes() > 1 and not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)
    return Accelerator(**kwargs)


def loader_options(device: torch.device, num_workers: int | None) -> dict:
    """DataLoader keywords: on a GPU, worker processes (None: up to 4) and pinned memory
    so host-to-device copies overlap compute; on the CPU, the configured workers (None: 0,
    the main process decodes; workers would take the cores the model needs)."""
    cuda = device.type == "cuda"
    workers = (min(4, os.cpu_count() or 1) if cuda else 0) if num_workers is None else num_workers
    return {"num_workers": workers, "pin_memory": cuda, "persistent_workers": workers > 0}


@contextmanager
def model_on(model: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """Run a model on `device` for a while (inference on the GPU when there is one), then
    put it back where it was, so callers keep a CPU model they can save or pass on."""
    original = next(model.parameters()).device
    model.to(device)
    try:
        yield model
    finally:
        model.to(original)
