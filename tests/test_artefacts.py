"""The unlabelled measures that compare translators on real images
(harmonize.evaluation.artefacts): each moves the way its name says."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from harmonize.evaluation.artefacts import artefact_scores, selection_score, structure_kept


@pytest.fixture(scope="module")
def images(tb_cxr):
    from harmonize.data.intensity import IntensityPolicy
    from harmonize.data.io import read_image
    from harmonize.data.manifest import load_manifest

    df = load_manifest(tb_cxr / "manifest.csv")
    policy = IntensityPolicy()

    def load(site, n):
        paths = df.loc[df["site"] == site, "path"].head(n)
        return [np.clip(policy.to_model(read_image(p))[0], 0, 1) for p in paths]

    return load("montgomery", 12), load("shenzhen", 12)


def test_each_measure_sees_what_it_names(images):
    sources, references = images
    same = artefact_scores(sources, sources, sources)
    assert same["structure"] == pytest.approx(1.0, abs=1e-3)
    assert same["texture_excess"] == 0 and same["spectrum_distance"] == 0
    assert same["intensity_distance"] < 0.005  # two pixel subsamples of one set
    raw = artefact_scores(sources, sources, references)
    rng = np.random.default_rng(0)
    # texture a GAN might add: high-frequency power goes up
    noisy = [np.clip(s + rng.normal(0, 0.05, s.shape), 0, 1) for s in sources]
    assert artefact_scores(sources, noisy, references)["texture_excess"] > \
        raw["texture_excess"] + 0.3
    # smoothing removes it, and moves the spectrum away
    smooth = [ndimage.gaussian_filter(s, 2) for s in sources]
    s_smooth = artefact_scores(sources, smooth, references)
    assert s_smooth["texture_excess"] < raw["texture_excess"] - 0.5
    assert s_smooth["spectrum_distance"] > raw["spectrum_distance"]
    # a monotone intensity change keeps the structure (local NCC is affine invariant)
    brighter = [0.2 + 0.7 * s for s in sources]
    assert structure_kept(sources[0], brighter[0]) == pytest.approx(1.0, abs=1e-3)
    # moved edges do not: the image shifted by 6 px
    assert structure_kept(sources[0], np.roll(sources[0], 6, axis=1)) < 0.9
    # the reference's own images are the best translation by the selection score
    assert selection_score(artefact_scores(references, references, references)) < \
        selection_score(raw)
    # inside a mask only: a change outside it (a burned-in marker painted over) is not
    # counted, the same change inside is
    x = sources[0]
    mask = np.zeros(x.shape, bool)
    mask[: x.shape[0] // 2] = True
    painted = x.copy()
    painted[-40:, -40:] = 1.0 - painted[-40:, -40:]
    assert structure_kept(x, painted, mask=mask) == pytest.approx(1.0, abs=1e-4)
    assert structure_kept(x, painted) < 0.99
    assert structure_kept(x, painted, mask=~mask) < structure_kept(x, painted)
    with_masks = artefact_scores(sources[:2], [painted, sources[1]], references, [mask] * 2)
    assert with_masks["structure_in_mask"] == pytest.approx(1.0, abs=1e-4)
