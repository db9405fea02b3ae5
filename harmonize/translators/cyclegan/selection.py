"""Choosing a snapshot without labels: `train.select_fraction` of the patients are held out
of training, and every snapshot (the histogram-residual translator's step 0 included: that
is histogram matching) translates their non-reference images. Each is scored with the
unlabelled measures of `harmonize.evaluation.artefacts` (remaining spectrum and intensity
distance to the held-out reference images, texture added, structure kept) and the lowest
`selection_score` becomes OUT/model. Histogram matching, fitted on the training rows, is
scored the same way, so the run says plainly when training did not beat it.

OUT/selection.csv holds every score; the chosen step is in the model's metadata.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.data import polarity as pol
from harmonize.data.fingerprints import remove_fingerprints
from harmonize.data.io import read_image
from harmonize.evaluation.artefacts import artefact_scores, selection_score
from harmonize.translators.base import Translator
from harmonize.translators.histogram import HistogramMatching

COLUMNS = ("step", "texture_excess", "spectrum_distance", "intensity_distance", "structure",
           "score")
BASELINE = "histogram-matching"


class SnapshotSelection:
    """Scores translators on the held-out images; `choose` names the best step."""

    def __init__(self, heldout: pd.DataFrame, reference_site: str, template: np.ndarray,
                 polarity: str, policy, out: Path, fingerprints: str = "keep") -> None:
        is_ref = heldout["site"].astype(str) == reference_site
        self.sources = [policy.to_model(read_image(p))[0] for p in heldout["path"][~is_ref]]
        self.sites = heldout["site"].astype(str)[~is_ref].tolist()
        self.references = [policy.to_model(read_image(p))[0] for p in heldout["path"][is_ref]]
        if not self.sources or not self.references:
            raise ValueError("train.select_fraction held out no image of the reference site "
                             "or none of the others: raise it or add images")
        # structure is measured against the upright input, as the translator sees it, and,
        # when the run removes fingerprints, without them: a border or marker inpainted is
        # not structure lost (histogram matching, which keeps them, is scored likewise)
        upright = [pol.upright(x, template, polarity) for x in self.sources]
        if fingerprints == "remove":
            upright = [remove_fingerprints(x)[0] for x in upright]
        self.upright = upright
        self.path = out / "selection.csv"
        self.rows: list[dict] = []
        if self.path.exists():  # a resumed run chooses among all its snapshots
            for row in pd.read_csv(self.path).to_dict("records"):
                step = row["step"]
                row["step"] = step if step == BASELINE else int(step)
                self.rows.append(row)

    def record(self, step: int | str, translator: Translator) -> dict:
        """Score one translator (a snapshot at `step`, or the baseline) and log it."""
        translations = translator.transform(self.sources, self.sites)
        scores = artefact_scores(self.upright, translations, self.references)
        row = {"step": step, **scores, "score": selection_score(scores)}
        self.rows.append(row)
        new = not self.path.exists()
        with open(self.path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, COLUMNS, lineterminator="\n")
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.5f}" if isinstance(v, float) else v)
                             for k, v in row.items()})
        return row

    def record_baseline(self, reference_images: Iterable[tuple[np.ndarray, str]],
                        reference_site: str, policy) -> dict:
        """Histogram matching fitted on the training rows' reference images."""
        hm = HistogramMatching(policy=policy).fit(reference_images, reference_site)
        return self.record(BASELINE, hm)

    def choose(self) -> tuple[dict, dict | None]:
        """(best snapshot row, baseline row or None)."""
        snapshots = [r for r in self.rows if r["step"] != BASELINE]
        baseline = next((r for r in self.rows if r["step"] == BASELINE), None)
        return min(snapshots, key=lambda r: r["score"]), baseline


def verdict(best: dict, baseline: dict | None) -> str:
    """One line for the console: what was chosen, and whether it beats histogram matching
    on the held-out images."""
    line = (f"selected step {best['step']} without labels (score {best['score']:.3f}, lower "
            "is better; OUT/selection.csv)")
    if baseline is None:
        return line
    if best["score"] >= baseline["score"]:
        return (f"{line}; NOT better than histogram matching on the held-out images "
                f"(score {baseline['score']:.3f}): consider harmonize train "
                "histogram-matching instead")
    return f"{line}; histogram matching scores {baseline['score']:.3f} on the same images"


def install(chosen: Path, model: Path) -> None:
    """Make the chosen snapshot OUT/model, replacing it atomically."""
    tmp = model.with_name(f".{model.name}.selected")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(chosen, tmp)
    old = model.with_name(f".{model.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if model.exists():
        os.replace(model, old)
    os.replace(tmp, model)
    shutil.rmtree(old, ignore_errors=True)
