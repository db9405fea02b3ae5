"""Training and scoring the study's arms, each a cached stage (`cache.py`): the
harmonized copies of the cohort (central or federated landmarks, with or without DP),
then one classifier per arm, scored on the external node."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harmonize.classify.config import TrainConfig
from harmonize.classify.networks import Classifier
from harmonize.classify.train import (
    adapt_batchnorm,
    fit_classifier,
    load_classifier,
    load_images,
    predict,
)
from harmonize.data.manifest import load_manifest
from harmonize.federated.config import FederatedConfig, load_federated_config
from harmonize.study.arms import Arm
from harmonize.study.cache import StageCache
from harmonize.study.config import StudyConfig
from harmonize.study.design import Design

HISTOGRAM_LANDMARKS = 8  # docs/federated.md: under DP 8 kept more of the gain than 16
# what part 2 runs besides an arm, not how the arm trains: out of its cache key, so adding
# an architecture or a translator reuses every arm trained before
CENTRAL_LISTS = {"other_classifiers", "pretrained", "leave_one_node_out", "translators"}


def _eps_key(epsilon: float) -> str:
    return "inf" if not math.isfinite(epsilon) else f"{epsilon:g}"


class Pipeline:
    def __init__(self, config: StudyConfig, design: Design, cache: StageCache) -> None:
        self.config, self.design, self.cache = config, design, cache
        self._images: dict[str, torch.Tensor] = {}
        self.translators = {t.name: t for t in config.central.translators}

    # --- harmonized copies ---------------------------------------------------------------
    def harmonizer_config(self, manifest: Path, out: Path, epsilon: float) -> FederatedConfig:
        private = math.isfinite(epsilon)
        return load_federated_config(None, {
            "task": "histogram", "rounds": 1, "seed": self.config.seed, "evaluate": False,
            "threads_per_node": 1, "progress": False, "manifest": str(manifest),
            "out": str(out), "reference_site": self.design.reference_site,
            "histogram.landmarks": HISTOGRAM_LANDMARKS,
            "privacy.mode": "patient-dp" if private else "none",
            "privacy.epsilon": epsilon if private else None,
            "privacy.delta": self.config.privacy.delta})

    def harmonized(self, images: str, epsilon: float = math.inf) -> str:
        """The cohort's manifest with every image harmonized (each hospital maps its own
        images): `images` central (landmarks fitted on the reference hospital's images)
        or federated (released by the reference hospital's node, optionally under DP)."""
        if images == "raw":
            return str(self.design.manifest)
        name = f"harmonize_{images}_eps{_eps_key(epsilon)}"
        inputs = {"images": images, "epsilon": _eps_key(epsilon),
                  "manifest": str(self.design.manifest), "seed": self.config.seed,
                  "reference": self.design.reference_site, "landmarks": HISTOGRAM_LANDMARKS}
        if images == "public":
            inputs["reference"] = str(self.design.public_manifest)
        if images == "unseen":
            inputs["reference"] = f"node {self.design.external_node}"
        if images in self.translators:
            inputs["translator"] = self.translators[images].model_dump(mode="json")
        return self.cache.run(name, inputs, lambda folder: self._harmonize(
            images, epsilon, folder))["manifest"]

    def _harmonize(self, images: str, epsilon: float, folder: Path) -> dict:
        from harmonize.evaluation.config import TranslatorSpec
        from harmonize.evaluation.harmonized_sets import harmonize_dataset

        reference = self.design.reference_site
        if images in self.translators:  # fitted / trained on the training nodes' images
            from harmonize.evaluation.harmonized_sets import build_model

            d = self.design
            train = d.training_manifest(d.df, folder / "train.csv")
            model = build_model(self.translators[images], train, d.df.iloc[d.train_rows],
                                reference, folder / "fit", progress=self.config.progress)
            spec = TranslatorSpec(name=images, kind=self.translators[images].resolved_kind,
                                  checkpoint=model)
        elif images == "central":
            spec = TranslatorSpec(name="histogram-matching",
                                  params={"n_quantiles": HISTOGRAM_LANDMARKS})
        elif images in ("public", "unseen"):  # the style of a set of images, pooled
            from harmonize.fit import fit_and_save
            from harmonize.translators import TRANSLATORS

            if images == "public":  # fitted on public images: nothing private travels
                source = self.design.public_manifest
                rows = load_manifest(source)
            else:  # the unseen node's unlabelled images (test-time reference)
                source = self.design.manifest
                rows = self.design.df.iloc[self.design.test_rows]
            reference = images  # all its images, whatever hospitals they came from
            model = fit_and_save(TRANSLATORS["histogram-matching"](
                n_quantiles=HISTOGRAM_LANDMARKS), rows.assign(site=reference), source,
                reference, folder / f"{images}_model", progress=False)
            spec = TranslatorSpec(name="histogram-matching", checkpoint=model)
        else:
            from harmonize.federated.run import run_federated

            train = self.design.training_manifest(self.design.df, folder / "train.csv")
            summary = run_federated(self.harmonizer_config(train, folder / "run", epsilon))
            if summary.get("model") is None:  # never fall back to another harmonizer
                raise RuntimeError(f"the federated histogram task wrote no landmarks (see "
                                   f"{folder / 'run' / 'rounds.csv'}): did the reference "
                                   "hospital's node answer?")
            spec = TranslatorSpec(name="histogram-matching", checkpoint=summary["model"])
        hs = harmonize_dataset(spec, self.design.manifest, self.design.df, reference,
                               folder, progress=False)
        return {"manifest": str(folder / "manifest.csv"), "seconds": hs.seconds}

    # --- classifiers ---------------------------------------------------------------------
    def images(self, manifest: str) -> torch.Tensor:
        if manifest not in self._images:
            paths = load_manifest(manifest)["path"].tolist()
            self._images[manifest] = load_images(paths, self.config.data.image_size,
                                                 progress=False)
        return self._images[manifest]

    def classifier_config(self, arm: Arm, manifest: Path, out: Path,
                          seed: int | None = None) -> FederatedConfig:
        f, c = self.config.federated, self.config.classifier
        return load_federated_config(None, {
            "task": "classifier", "rounds": f.rounds,
            "strategy": "fedprox" if arm.training == "fedprox" else "fedavg",
            "proximal_mu": f.proximal_mu,
            "seed": self.config.seed if seed is None else seed, "evaluate": False,
            "progress": False, "threads_per_node": 1, "parallel_nodes": f.parallel_nodes,
            "manifest": str(manifest), "out": str(out),
            "classifier.model.arch": c.arch, "classifier.model.width": c.width,
            "classifier.model.pretrained": c.pretrained,
            "classifier.model.norm": arm.norm, "classifier.image_size":
                self.config.data.image_size, "classifier.local_epochs": f.local_epochs,
            "classifier.batch_size": f.batch_size, "classifier.lr": f.lr,
            "classifier.augment": arm.augment, "classifier.local_bn": arm.training == "fedbn",
            "classifier.local_head": arm.training == "fedper",
            "classifier.keep_optimizer": True,
            "classifier.balance": "none" if arm.norm == "group" else "weighted-loss",
            "privacy.mode": "patient-dp" if arm.private else "none",
            "privacy.epsilon": arm.epsilon if arm.private else None,
            "privacy.delta": self.config.privacy.delta,
            "privacy.max_grad_norm": self.config.privacy.max_grad_norm,
            "privacy.secagg": arm.secagg})

    def predictions(self, arm: Arm, seed: int | None = None) -> dict:
        """The arm's scores on the external node's images (and its cost), its classifier
        trained with `seed` (default: the study's seed)."""
        seed = self.config.seed if seed is None else seed
        manifest = self.harmonized(arm.images, arm.harmonizer_epsilon)
        inputs = {"arm": arm.as_dict(), "manifest": manifest, "seed": seed,
                  "classifier": self.config.classifier.model_dump(mode="json"),
                  "training": (self.config.federated.model_dump(mode="json") if arm.federated
                               else self.config.central.model_dump(
                                   mode="json", exclude=CENTRAL_LISTS)),
                  "pretrained": self.pretrained_file(arm),
                  "image_size": self.config.data.image_size,
                  "privacy": self.config.privacy.model_dump(mode="json")}
        name = f"classifier_{arm.name}" + ("" if seed == self.config.seed
                                             else f"_seed{seed}")
        return self.cache.run(name, inputs, lambda folder: self._train_and_score(
            arm, manifest, folder, seed))

    def left_out_predictions(self, arm: Arm) -> dict:
        """Leave one training node out (central arms): each training node's images scored
        by the arm trained on the other training nodes, in `design.train_rows` order."""
        manifest = self.harmonized(arm.images, arm.harmonizer_epsilon)
        inputs = {"arm": arm.as_dict(), "manifest": manifest, "seed": self.config.seed,
                  "classifier": self.config.classifier.model_dump(mode="json"),
                  "training": self.config.central.model_dump(
                      mode="json", exclude=CENTRAL_LISTS),
                  "pretrained": self.pretrained_file(arm),
                  "image_size": self.config.data.image_size,
                  "nodes": self.design.training_nodes}
        return self.cache.run(f"left-out_{arm.name}", inputs,
                              lambda folder: self._score_left_out(arm, manifest))

    def _score_left_out(self, arm: Arm, manifest: str) -> dict:
        d = self.design
        x = self.images(manifest)
        node = d.df["node"].to_numpy()[d.train_rows]
        p = np.zeros(len(d.train_rows))
        for held in d.training_nodes:
            fit = d.train_rows[node != held]
            model = self._fit_central(arm, x[fit], d.labels[fit], self.config.seed)
            p[node == held] = predict(model, x[d.train_rows[node == held]])
        return {"p": [float(v) for v in p]}

    def _fit_central(self, arm: Arm, x, y, seed: int) -> Classifier:
        tc = TrainConfig(epochs=self.config.central.epochs,
                         batch_size=self.config.central.batch_size,
                         lr=self.config.central.lr, seed=seed,
                         augment="plain" if arm.augment else "none", progress=False)
        model_cfg = self.config.classifier
        if arm.arch:
            model_cfg = model_cfg.model_copy(update={
                "arch": arm.arch, "pretrained": self.config.central.pretrained.get(arm.arch)})
        return fit_classifier(x, y, model_cfg, tc)

    def pretrained_file(self, arm: Arm) -> dict | None:
        """The ImageNet file an arm starts from, named by path and size (in its cache key)."""
        path = (self.config.central.pretrained.get(arm.arch) if arm.arch
                else self.config.classifier.pretrained)
        return None if path is None else {"path": str(path), "bytes": path.stat().st_size}

    def _train_and_score(self, arm: Arm, manifest: str, folder: Path, seed: int) -> dict:
        d = self.design
        x = self.images(manifest)
        test = x[d.test_rows]
        cost: dict = {}
        if not arm.federated:
            model = self._fit_central(arm, x[d.train_rows], d.labels[d.train_rows], seed)
        else:
            from harmonize.federated.run import run_federated

            frame = load_manifest(manifest)
            train = d.training_manifest(frame, folder / "train.csv")
            summary = run_federated(self.classifier_config(arm, train, folder / "run", seed))
            model, _, _ = load_classifier(summary["model"])
            if arm.training == "fedbn":  # its BatchNorm stayed at the nodes: the
                model = adapt_batchnorm(model, test)  # unseen hospitals use their own
            cost = round_cost(folder / "run" / "rounds.csv", summary)
        p = predict(model, test)
        return {"p": [float(v) for v in p], "cost": cost}


def round_cost(rounds_csv: Path, summary: dict) -> dict:
    """Seconds per round and bytes each node sent per round (its mean over nodes, the
    number rounds.csv averages), and the run's epsilon."""
    rounds = pd.read_csv(rounds_csv)
    seconds = np.diff(np.concatenate([[0.0], rounds["seconds"].to_numpy(float)]))
    out = {"seconds_per_round": float(np.median(seconds)),
           "rounds": int(len(rounds)), "epsilon": summary.get("epsilon")}
    if "train_bytes_sent" in rounds:
        out["bytes_per_node_round"] = float(rounds["train_bytes_sent"].mean())
    return out
