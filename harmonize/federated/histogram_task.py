"""Federated histogram matching: the reference node releases its intensity landmarks once.

The smallest translator there is: L intensity quantiles of the reference site (the mean,
over its patients, of each patient's quantile vector at L evenly spaced levels; a
patient's images are averaged first) and a small mean thumbnail (T x T) for the polarity
guard (an inverted export anti-correlates with it and is flipped first, as `harmonize
fit histogram` does). Only the reference node sends anything, these L + T^2 numbers,
once; every node maps its own images onto them (`harmonize apply --model OUT/model`, the
same `HistogramMatching`).

Under `privacy.mode: patient-dp` they are released with the Gaussian mechanism. Each
patient contributes v = [quantiles in [0, 1]^L, a * thumbnail in a * [0, 1]^(T^2)] with
a = sqrt(L / T^2), a box of L2 diameter sqrt(2 L): replacing one patient's images by
another's moves the sum over patients by at most that (bounded DP: the patient count is
public, the mean divides by it; the bound plays the part of DP-SGD's clipping norm).
Noise N(0, (sigma sqrt(2 L))^2) is added to the sum, sigma calibrated by Opacus'
accountant for one release without subsampling
(`patient_dp.plan_patient_dp` with every patient in the one "step"); sorting and clipping
the landmarks to [0, 1] and rescaling the thumbnail is post-processing. The thumbnail
only needs the sign of a correlation, so it tolerates the larger noise a gets it. Few
landmarks keep the noise small (Nyul & Udupa's standard uses about ten).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harmonize.configs import ConfigError
from harmonize.data import polarity as pol
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.federated import patient_dp
from harmonize.federated.config import FederatedConfig
from harmonize.federated.local_prior_task import aggregate_reference_reply
from harmonize.federated.node_state import Arrays
from harmonize.federated.task_interface import FederatedTask
from harmonize.translators.histogram import HistogramMatching

LANDMARKS, TEMPLATE = "reference_quantiles", "template"


class HistogramTask(FederatedTask):
    kind = "histogram-matching"
    eval_keys = ()

    def __init__(self, config: FederatedConfig) -> None:
        self.config = config
        self.ref = str(config.reference_site)
        self.landmarks = config.histogram.landmarks
        self.thumb = config.histogram.template
        self.scale = float(np.sqrt(self.landmarks / self.thumb**2))  # a of the docstring
        self.policy = IntensityPolicy(mode=config.histogram.intensity)

    def initial_arrays(self) -> Arrays:
        return {}  # the landmarks exist only once the reference node has computed them

    def custom_aggregation(self):
        return aggregate_reference_reply

    def _reference_rows(self, rows: pd.DataFrame) -> pd.DataFrame:
        return rows[rows["site"].astype(str) == self.ref].reset_index(drop=True)

    def dp_plan(self, rows: pd.DataFrame, node: str = ""):
        """One Gaussian release of the landmark sum; None at a node without the reference
        site (it sends nothing)."""
        return patient_dp.single_release_plan(self._reference_rows(rows), self.config.privacy,
                                              np.sqrt(2 * self.landmarks), node)

    def patient_features(self, rows: pd.DataFrame) -> np.ndarray:
        """(patients, L + T^2): each patient's mean [quantiles, a * thumbnail], in model
        space [0, 1] (so each row's norm is at most sqrt(2 L))."""
        levels = np.linspace(0.0, 1.0, self.landmarks)
        patient_of_row, _ = patient_dp.patient_index(rows)
        feats = []
        for path in rows["path"].astype(str):
            x = np.clip(self.policy.to_model(read_image(path))[0], 0.0, 1.0)
            feats.append(np.concatenate([np.quantile(x.ravel(), levels),
                                         self.scale * pol.thumbnail(x, self.thumb).ravel()]))
        sums = np.zeros((patient_of_row.max() + 1, len(feats[0])))
        np.add.at(sums, patient_of_row, np.stack(feats))
        return sums / np.bincount(patient_of_row)[:, None]

    def train(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame,
              round_config: dict) -> tuple[Arrays, Arrays, dict]:
        ref = self._reference_rows(rows)
        if ref.empty:  # a source node: nothing to send
            return {}, {}, {"is_reference": 0.0, "num-examples": 1}
        per_patient = self.patient_features(ref)
        total = per_patient.sum(0)
        extra = {}
        if self.config.privacy.mode == "patient-dp":
            plan, _ = self.dp_plan(rows, str(rows["node"].iloc[0]))
            total = patient_dp.gaussian_release(total, plan)
            extra = patient_dp.dp_metrics(plan, 1)
        mean = total / len(per_patient)
        landmarks = np.clip(np.sort(mean[: self.landmarks]), 0.0, 1.0)
        template = (mean[self.landmarks:] / self.scale).reshape(self.thumb, self.thumb)
        return ({LANDMARKS: torch.from_numpy(landmarks),
                 TEMPLATE: torch.from_numpy(template.astype(np.float32))}, {},
                {"is_reference": 1.0, "num-examples": 1, **extra})

    def evaluate(self, arrays: Arrays, local: Arrays | None, rows: pd.DataFrame) -> dict:
        return {"num-examples": 0}

    def translator(self, arrays: Arrays) -> HistogramMatching:
        hm = HistogramMatching(n_quantiles=self.landmarks, polarity="auto", policy=self.policy)
        hm.reference_quantiles_ = arrays[LANDMARKS].double().numpy()
        hm.template_ = arrays[TEMPLATE].float().numpy()
        hm.site_quantiles_ = {}
        hm.reference_site_ = self.ref
        return hm

    def save(self, arrays: Arrays, out: Path, metadata: dict) -> Path:
        if LANDMARKS not in arrays:
            raise ConfigError("no landmarks arrived: is the reference site a node?")
        return self.translator(arrays).save(out, metadata)
