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
