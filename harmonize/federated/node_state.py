"""What a node keeps between rounds and sends: flat arrays of tensors (Flower's
ArrayRecord), the node's decoded images (cached per process), optimizer state."""

from __future__ import annotations

import torch

from harmonize.classify.train import load_images

Arrays = dict[str, torch.Tensor]
_IMAGES: dict[tuple, torch.Tensor] = {}  # per process: a node's decoded images, reused


def cached_images(paths: list[str], size: int) -> torch.Tensor:
    key = (tuple(paths), size)
    if key not in _IMAGES:
        _IMAGES[key] = load_images(paths, size, progress=False)
    return _IMAGES[key]


def optimizer_arrays(opt: torch.optim.Optimizer) -> Arrays:
    """The optimizer's per-parameter state (Adam moments, momentum) as flat arrays, so it
    can stay in the node's context.state between rounds; it never leaves the node."""
    return {f"opt.{index}.{name}": torch.as_tensor(value).detach().clone()
            for index, state in opt.state_dict()["state"].items()
            for name, value in state.items()}


def load_optimizer_state(opt: torch.optim.Optimizer, arrays: Arrays) -> None:
    state: dict[int, dict] = {}
    for key, value in arrays.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    if state:
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
