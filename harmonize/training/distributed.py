"""Checks that N training processes are one training.

Under `torchrun` / `accelerate launch` every process holds a replica of each network;
DDP averages the gradients so the replicas stay identical. A network left out of
`accelerator.prepare`, a buffer that is not broadcast, or a process that skipped a step
makes them drift silently, and rank 0's copy is what gets saved. So before a checkpoint
each process sends one fingerprint of its weights and the run stops if they differ.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import Accelerator


def weights_fingerprint(nets: Iterable[torch.nn.Module]) -> torch.Tensor:
    """Per network: the sum and the sum of squares of its parameters (float64).
    Bit-identical replicas give identical numbers; drifted ones practically never do.
    Buffers are left out: DDP copies rank 0's BatchNorm statistics into every replica at
    the start of each forward, after which each replica updates them with its own batch,
    so they differ by one batch after the last step (rank 0's are the ones saved)."""
    rows = []
    for net in nets:
        total = torch.zeros(2, dtype=torch.float64)
        for t in net.parameters():  # one tensor at a time in float64: no full copy
            if t.is_floating_point():
                d = t.detach().double()
                total += torch.stack([d.sum(), (d * d).sum()]).cpu()
        rows.append(total)
    return torch.stack(rows) if rows else torch.zeros((0, 2), dtype=torch.float64)


def check_ranks_agree(accelerator: Accelerator, nets: Iterable[torch.nn.Module],
                      where: str) -> None:
    """Raise on every process if the replicas differ (a collective: all processes call it)."""
    if accelerator.num_processes == 1:
        return
    nets = list(nets)
    mine = weights_fingerprint(nets).to(accelerator.device)
    every = accelerator.gather(mine[None]).reshape(accelerator.num_processes, *mine.shape)
    if not torch.equal(every, every[:1].expand_as(every)):
        raise RuntimeError(
            f"{where}: the {accelerator.num_processes} training processes hold different "
            "weights, so they are not one training (a network not passed to "
            "accelerator.prepare, or a step skipped on one rank); nothing was saved")


def average_gradients(accelerator: Accelerator, nets: Iterable[torch.nn.Module]) -> None:
    """Average the gradients of networks that are *not* wrapped by DDP over the processes
    (call after backward, before the optimizer step; every process calls it).

    DDP synchronizes only what runs through its wrapper's forward. A loop that also calls
    a network's other methods (CUT's PatchNCE reads the generator's encoder) keeps its
    networks unwrapped and averages here instead, once per optimizer step (with gradient
    accumulation, on the micro-step that steps). One flat all-reduce per network."""
    if accelerator.num_processes == 1 or not accelerator.sync_gradients:
        return
    for net in nets:
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= accelerator.num_processes
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_weights(accelerator: Accelerator, nets: Iterable[torch.nn.Module]) -> None:
    """Give every process rank 0's weights, as DDP does when it wraps a network (each
    process seeds differently, so fresh initializations differ)."""
    if accelerator.num_processes == 1:
        return
    for net in nets:
        for t in net.state_dict().values():
            torch.distributed.broadcast(t, src=0)
