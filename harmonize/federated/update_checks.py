"""What a node sends is checked before it is averaged.

A node whose update holds NaN or Inf, has other arrays, shapes or dtypes than the global
model it was sent, or whose change to the model is far larger than the other nodes'
(more than `norm_factor` times the round's median change; a broken node, a wrong
learning rate, or an attack) is dropped from the round and named in rounds.csv. The
median needs at least three updates to tell the odd one out; with two there is no
majority and only the finiteness and shape checks apply. The norm check is for the
classifier task: in the translator tasks each node computes other terms of the objective
(its own site's), so their updates differ in size by design.

Whether the round is then aggregated follows the rule for failed nodes (at least
`min_nodes` good replies, by default every node): an objective that is a sum over the
nodes (the CycleGAN decomposition) must not be averaged without one of its terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

Arrays = dict[str, torch.Tensor]


@dataclass
class UpdateCheck:
    current: Arrays  # the global arrays the nodes were sent this round
    norm_factor: float | None = 10.0
    compare_arrays: bool = True  # False: replies are not the model (nothing averaged)
    layout: dict[str, tuple] = field(init=False)

    def __post_init__(self) -> None:
        self.layout = {k: (tuple(v.shape), v.dtype) for k, v in self.current.items()}

    def problem(self, arrays: Arrays) -> str | None:
        """Why these arrays cannot be averaged, in words; None when they can."""
        bad = [k for k, v in arrays.items() if v.is_floating_point() and
               not bool(torch.isfinite(v).all())]
        if bad:
            return f"NaN or Inf in {len(bad)} array(s) (e.g. {bad[0]})"
        if not self.compare_arrays:
            return None
        missing, extra = set(self.layout) - set(arrays), set(arrays) - set(self.layout)
        if missing or extra:
            return (f"arrays differ from the model sent ({len(missing)} missing, "
                    f"{len(extra)} unknown, e.g. {sorted(missing or extra)[0]})")
        for k, v in arrays.items():
            if (tuple(v.shape), v.dtype) != self.layout[k]:
                shape, dtype = self.layout[k]
                return (f"{k} is {tuple(v.shape)} {v.dtype}, the model sent "
                        f"{shape} {dtype}")
        return None

    def change(self, arrays: Arrays) -> float:
        """The norm of this update: how far it moves the floating-point arrays."""
        total = 0.0
        for k, v in arrays.items():
            if v.is_floating_point() and k in self.current:
                total += float(((v.double() - self.current[k].double()) ** 2).sum())
        return total ** 0.5

    def screen(self, updates: list[tuple[str, Arrays]]) -> tuple[list[int], dict[str, str]]:
        """(indices of the updates to aggregate, {node: why its update was dropped})."""
        dropped: dict[str, str] = {}
        kept = []
        for i, (name, arrays) in enumerate(updates):
            reason = self.problem(arrays)
            if reason is None:
                kept.append(i)
            else:
                dropped[name] = reason
        if self.compare_arrays and self.norm_factor is not None and len(kept) >= 3:
            norms = {i: self.change(updates[i][1]) for i in kept}
            median = float(np.median(list(norms.values())))
            if median > 0:
                for i in list(kept):
                    if norms[i] > self.norm_factor * median:
                        kept.remove(i)
                        dropped[updates[i][0]] = (
                            f"update norm {norms[i]:.3g} is {norms[i] / median:.0f}x the "
                            f"round's median {median:.3g} (limit {self.norm_factor:g}x)")
        return kept, dropped

    def advance(self, arrays: Arrays) -> None:
        """The aggregated model becomes what the next round's updates are compared with."""
        self.current = {k: v.detach().clone() for k, v in arrays.items()}
