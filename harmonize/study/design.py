"""The study's design, made and checked before anything trains: the cohort (generated or
read), the reference hospital, the node held out as unseen hospitals, the training nodes.
A design that cannot run is refused with the problem and the fix."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.configs import ConfigError
from harmonize.data.manifest import binary_targets, load_manifest, positive_label, save_manifest
from harmonize.study.config import StudyConfig


@dataclass
class Design:
    manifest: Path
    df: pd.DataFrame  # load_manifest's frame: absolute paths, node, relpath
    labels: np.ndarray  # 0/1 per row
    positive: str
    reference_site: str
    external_node: str
    training_nodes: list[str]
    public_manifest: Path | None = None  # the public-reference design's reference images

    @property
    def train_rows(self) -> np.ndarray:
        return np.flatnonzero(self.df["node"].isin(self.training_nodes).to_numpy())

    @property
    def test_rows(self) -> np.ndarray:
        return np.flatnonzero((self.df["node"] == self.external_node).to_numpy())

    def training_manifest(self, frame: pd.DataFrame, path: Path) -> Path:
        """`frame` (the cohort, raw or harmonized paths) restricted to the training
        nodes, as a manifest the federated runs read."""
        save_manifest(frame.iloc[self.train_rows], path)
        return path


def make_cohort(config: StudyConfig, out: Path) -> tuple[Path, str | None]:
    """The manifest (generated when data.synth, reused while its settings stay the same)
    and synth's reference site."""
    if config.data.synth is None:
        return Path(config.data.manifest), None
    from harmonize.synth import cohort_sizes, generate

    s = config.data.synth
    folder = out / "data"
    wanted = s.model_dump(mode="json")
    saved = folder / "cohort.json"
    if not (folder / "manifest.csv").is_file() or not saved.is_file() or \
            json.loads(saved.read_text()) != wanted:
        sizes = cohort_sizes(s.sites, s.patients_per_site, s.size_spread, s.seed)
        generate(folder, sites=s.sites, per_site=sizes, size=s.size, seed=s.seed,
                 prevalence=s.prevalence, finding_scale=s.finding_scale,
                 images_per_patient=s.images_per_patient, nodes=s.nodes,
                 progress=config.progress)
        if s.public_images:  # other patients (another seed), the reference's acquisition
            generate(folder / "public", sites=1, per_site=s.public_images, size=s.size,
                     seed=s.seed + 1_000_003, prevalence=s.prevalence,
                     finding_scale=s.finding_scale, progress=False)
        saved.write_text(json.dumps(wanted))
    return folder / "manifest.csv", json.loads((folder / "synth.json").read_text())[
        "reference_site"]


def public_manifest(config: StudyConfig, out: Path) -> Path | None:
    if config.data.synth is not None:
        return out / "data" / "public" / "manifest.csv" if config.data.synth.public_images \
            else None
    path = config.data.public_reference
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"data.public_reference: {path} not found (a manifest of the "
                          "public reference images)")
    return path


def split_nodes(manifest: Path, splits: dict[str, int], out: Path, seed: int) -> Path:
    """The manifest with hospitals split into patient-disjoint nodes `{site}_1..n`,
    each with about the same share of positive patients, each half named as a hospital
    of its own (site = node: the federated harmonizer needs its reference hospital at
    one node); written to OUT/data."""
    df = load_manifest(manifest)
    unknown = sorted(set(splits) - set(df["site"].astype(str)))
    if unknown:
        raise ConfigError(f"data.split_nodes: {unknown} not hospitals of {manifest}")
    rng = np.random.default_rng(seed)
    for site, n in splits.items():
        rows = df["site"] == site
        patients = df[rows].groupby("patient_id")["label"].first()
        order = patients.sample(frac=1.0, random_state=rng.integers(2**31)).sort_values(
            kind="stable")  # shuffled, then grouped by label: round-robin stratifies
        node = {p: f"{site}_{i % n + 1}" for i, p in enumerate(order.index)}
        df.loc[rows, "node"] = df.loc[rows, "patient_id"].map(node)
        df.loc[rows, "site"] = df.loc[rows, "node"]
    path = out / "data" / "manifest_nodes.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_manifest(df, path)
    return path


def make_design(config: StudyConfig, out: Path) -> Design:
    manifest, synth_reference = make_cohort(config, out)
    if config.data.split_nodes:
        manifest = split_nodes(manifest, config.data.split_nodes, out, config.seed)
    df = load_manifest(manifest).reset_index(drop=True)
    reference = config.data.reference_site or synth_reference
    if reference is None:
        raise ConfigError("data.reference_site: name the hospital whose style is the target")
    nodes = sorted(df["node"].astype(str).unique(), key=natural_key)
    external = config.data.external_node or nodes[-1]
    problems = []
    if len(nodes) < 3:
        problems.append(f"{manifest}: {len(nodes)} node(s); the study needs at least two "
                        "training nodes and one external node (add a node column grouping "
                        "the hospitals)")
    if external not in nodes:
        problems.append(f"data.external_node '{external}' is not a node of {manifest} "
                        f"(nodes: {', '.join(nodes)})")
    sites = set(df["site"].astype(str))
    if reference not in sites:
        problems.append(f"data.reference_site '{reference}' is not a hospital of {manifest}")
    elif (df.loc[df["site"] == reference, "node"] == external).any():
        problems.append(f"the reference hospital '{reference}' is in the external node "
                        f"'{external}': its style must be learnt from a training node; "
                        "choose another external_node or reference_site")
    elif df.loc[df["site"] == reference, "node"].nunique() > 1:
        problems.append(f"the reference hospital '{reference}' is at nodes "
                        f"{sorted(df.loc[df['site'] == reference, 'node'].unique())}: the "
                        "federated harmonizer takes its landmarks from one node; give it "
                        "one node (or name one part of it as the reference)")
    if problems:
        raise ConfigError("; ".join(problems))
    positive = positive_label(df["label"].astype(str))
    labels = binary_targets(df, positive=positive)
    if (labels < 0).any():
        raise ConfigError(f"{manifest}: {(labels < 0).sum()} row(s) have no label")
    two_nodes = df.groupby("patient_id")["node"].nunique()
    if (two_nodes > 1).any():
        raise ConfigError(f"{manifest}: patient(s) {list(two_nodes[two_nodes > 1].index[:3])} "
                          "appear at two nodes; a patient belongs to one hospital")
    training = [n for n in nodes if n != external]
    for node in [*training, external]:
        y = labels[(df["node"] == node).to_numpy()]
        if y.min() == y.max():
            what = "positives" if y.max() == 0 else "negatives"
            role = "external node" if node == external else "training node"
            raise ConfigError(f"{role} '{node}' has no {what}: a classifier cannot be "
                              f"{'scored' if node == external else 'trained'} there; "
                              "group its hospitals with another node's")
    return Design(manifest, df, labels, positive, reference, external, training,
                  public_manifest(config, out))


def natural_key(name: str) -> tuple:
    """site_b < site_j < site_aa, node_2 < node_10: names in the order people count."""
    stem = name.rstrip("0123456789")
    digits = name[len(stem):]
    letters = stem.rsplit("_", 1)[-1]
    return (len(digits), digits, len(letters), name)
