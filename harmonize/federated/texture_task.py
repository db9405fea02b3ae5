"""Federated texture matching: the reference node releases its targets once; every other
node fits its own site's statistics at home.

Texture matching (`harmonize.translators.texture`) needs, per site, that site's mean ROI
quantiles and ring spectrum, and from the reference site its quantiles, spectrum, noise
model and polarity template. Only the last travel: the reference node fits them on its
images (`TextureMatching.fit_reference`) and sends them in round 1 (a few thousand
numbers); every node then adds its own sites' statistics (`fit_site`) after the last
round and keeps the translator it harmonizes with at home (OUT/nodes/NODE/model). No
statistic of a source site ever leaves its node. The result equals central fitting
exactly (tested). The global OUT/model holds the reference release only: for a site it
has not seen, it matches each image on its own.

Under `privacy.mode: patient-dp` the reference node releases a compact set of
per-patient means instead, with the Gaussian mechanism (`harmonize.federated.texture_dp`),
and then fits its own site at home like every other node.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harmonize.configs import ConfigError
from harmonize.data.intensity import IntensityPolicy
from harmonize.federated import patient_dp, texture_dp
from harmonize.federated.config import FederatedConfig
from harmonize.federated.local_prior_task import aggregate_reference_reply
from harmonize.federated.node_state import Arrays
from harmonize.federated.task_interface import FederatedTask
from harmonize.fit import model_space_images_with_masks
from harmonize.translators.texture import TextureMatching


class TextureTask(FederatedTask):
    kind = "texture-matching"
    eval_keys = ()

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        self.ref = str(config.reference_site)
        settings = config.texture
        self.params = settings.model_dump(exclude={"intensity"})
        self.policy = IntensityPolicy(mode=settings.intensity)

    def fresh(self) -> TextureMatching:
        return TextureMatching(**self.params, policy=self.policy)

    def _rows(self, rows: pd.DataFrame, site: str) -> list[tuple]:
        part = rows[rows["site"].astype(str) == site]
        return list(model_space_images_with_masks(part, self.policy, progress=False))

    def initial_arrays(self) -> Arrays:
        return {}  # the targets exist only once the reference node has computed them

    def custom_aggregation(self):
        return aggregate_reference_reply

    def _reference_rows(self, rows: pd.DataFrame) -> pd.DataFrame:
        return rows[rows["site"].astype(str) == self.ref].reset_index(drop=True)

    def dp_plan(self, rows: pd.DataFrame, node: str = ""):
        """One Gaussian release of the patients' vectors; None at a node without the
        reference site (it sends nothing)."""
        if self.config.privacy.mode != "patient-dp":
            return None
        return patient_dp.single_release_plan(self._reference_rows(rows), self.config.privacy,
                                              texture_dp.DIAMETER, node)

    def train(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame,
              round_config: dict) -> tuple[Arrays, Arrays, dict]:
        ref = self._reference_rows(rows)
        if ref.empty:  # a source node: nothing to send
            return {}, {}, {"is_reference": 0.0, "num-examples": 1}
        images = self._rows(rows, self.ref)
        if self.config.privacy.mode != "patient-dp":
            released = self.fresh().fit_reference(images, self.ref)
            return (released.state_tensors(), {}, {"is_reference": 1.0, "num-examples": 1})
        plan, _ = self.dp_plan(rows, str(rows["node"].iloc[0]))
        released = self.fresh()
        released.reference_site_ = self.ref
        texture_dp.private_release(released, images, ref, plan)
        return (released.state_tensors(), {},
                {"is_reference": 1.0, "num-examples": 1, **patient_dp.dp_metrics(plan, 1)})

    def evaluate(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame) -> dict:
        return {"num-examples": 0}

    def translator(self, arrays: Arrays) -> TextureMatching:
        """The reference release as a translator (no source site's statistics yet)."""
        model = self.fresh()
        model.reference_site_ = self.ref
        model.load_state_tensors({k: v.detach().cpu() for k, v in arrays.items()}, {})
        return model

    def finish(self, arrays: Arrays, rows: pd.DataFrame) -> Path | None:
        """After the release: this node's own sites fitted at home, the translator saved
        there."""
        if not arrays:
            return None
        node = str(rows["node"].iloc[0])
        model = self.translator(arrays)
        # the plain release holds the reference site's own statistics; a private one
        # does not, and the reference node fits its site at home like the others
        sites = sorted(set(rows["site"].astype(str)) - set(model.site_quantiles_))
        for site in sites:
            model.fit_site(self._rows(rows, site), site)
        meta = {"federated": {"task": "texture", "node": node}, "sites": sites}
        return model.save(self.home(node) / "model", meta)

    def save(self, arrays: Arrays, out: Path, metadata: dict) -> Path:
        if not arrays:
            raise ConfigError("no texture statistics arrived: is the reference site a node?")
        return self.translator(arrays).save(out, metadata)

