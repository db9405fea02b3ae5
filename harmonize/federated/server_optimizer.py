"""A server-side optimizer over the nodes' aggregated updates (FedOpt, Reddi et al.
"Adaptive Federated Optimization", ICLR 2021).

Each node takes K local SGD steps of learning rate `local_lr` on its share of the global
objective and returns w_k = w - (the sum of its K local gradients): its update in
gradient units (w minus lr-scaled steps would lose small gradients to the fp32 rounding
of w). The strategy (FedAvg with equal weights, optionally wrapped by Flower's DP
clipping and noise, which then clip in gradient units) averages them. The server turns
the average into a gradient estimate,

    g = n * (w - mean_k w_k) / K = sum_k (w - w_k) / K,

the sum over nodes because the objective is a sum of the nodes' terms, and steps a
torch optimizer on it: `adam` (central training's optimizer, same betas and schedule) or
`sgd` (the nodes' SGD steps, summed). With K = 1 a round is one central step: every
node's gradient is taken at the same weights, and their sum is the central gradient, so
Adam on the server reproduces central training (FedSGD). The optimizer state (Adam
moments) lives at the server only; it is built from public aggregates.

Applied after the DP wrapper, so the noise is added to what the nodes sent and the
optimizer only post-processes it (no effect on the privacy guarantee).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Arrays = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ServerOptimizerSpec:
    kind: str  # "adam" or "sgd"
    lr: float  # server learning rate (adam); the nodes' local_lr carries sgd
    betas: tuple[float, float]
    local_lr: float  # the nodes' SGD learning rate (the `sgd` server applies it)
    local_steps: int
    lr_factor: Callable[[int], float] = lambda server_round: 1.0


class ServerOptimizer:
    def __init__(self, spec: ServerOptimizerSpec, arrays: Arrays) -> None:
        self.spec = spec
        self.params = {k: torch.nn.Parameter(v.detach().clone().float(), requires_grad=False)
                       for k, v in arrays.items() if v.is_floating_point()}
        self.buffers = {k: v.clone() for k, v in arrays.items() if not v.is_floating_point()}
        self.adam = (torch.optim.Adam(list(self.params.values()), lr=spec.lr,
                                      betas=spec.betas) if spec.kind == "adam" else None)

    def step(self, server_round: int, mean: Arrays, nodes: int) -> Arrays:
        """New global weights from the strategy's average of `nodes` replies (each
        w - the sum of that node's K local gradients)."""
        scale = nodes / self.spec.local_steps
        factor = self.spec.lr_factor(server_round)
        with torch.no_grad():
            for key, p in self.params.items():
                gradient = (p - mean[key].float()) * scale  # summed over nodes, per step
                if self.adam is None:  # the nodes' own SGD, summed
                    p -= gradient * self.spec.local_lr * self.spec.local_steps * factor
                else:
                    p.grad = gradient
        if self.adam is not None:
            for group in self.adam.param_groups:
                group["lr"] = self.spec.lr * factor
            self.adam.step()
        self.buffers = {k: mean[k].clone() for k in self.buffers}
        return {**{k: p.detach().clone() for k, p in self.params.items()}, **self.buffers}


    def state_dict(self) -> dict:
        """Everything a resumed run needs to step on as if never stopped."""
        return {"params": {k: p.detach().clone() for k, p in self.params.items()},
                "buffers": self.buffers,
                "adam": self.adam.state_dict() if self.adam is not None else None}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state["params"][k])
        self.buffers = {k: v.clone() for k, v in state["buffers"].items()}
        if self.adam is not None and state["adam"] is not None:
            self.adam.load_state_dict(state["adam"])
