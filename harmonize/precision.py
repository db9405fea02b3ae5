"""Which arithmetic a device runs natively: the 'auto' precision of the translators."""

from __future__ import annotations

import torch


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


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """'auto' -> 'bf16' where it runs natively (measured: 1.8x fp32 for the CycleGAN
    generator on a 2-core AVX-512 BF16 CPU, SSIM to the fp32 output > 0.995, see
    docs/performance.md), else 'fp32'; any other value is returned as given."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def training_precision(setting: str, cpu_bf16: bool = True) -> str:
    """accelerate's mixed_precision for a training. 'auto' -> 'bf16' on a GPU that has
    it, and on a CPU that runs bf16 natively when `cpu_bf16` (networks measured to train
    like fp32 there: CycleGAN, docs/performance.md; the diffusion priors, whose quick
    config trains in bf16), else 'no' (fp32)."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if native_bf16("cuda") else "no"
    return "bf16" if cpu_bf16 and native_bf16("cpu") else "no"
