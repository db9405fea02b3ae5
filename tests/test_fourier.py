"""Fourier-amplitude harmonization (FDA / FedDG style) on real chest X-rays."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.stats import wasserstein_distance

from harmonize.data.polarity import correlation
from harmonize.translators import FourierAmplitudeMatching, NotFittedError, load_translator


@pytest.fixture(scope="module")
def fitted(two_sites):
    return FourierAmplitudeMatching().fit(two_sites, reference_site="shenzhen")


def _site(two_sites, name):
    return [x for x, s in two_sites if s == name]


def _low_amplitude(model, x):
    return np.abs(model._block(np.fft.fft2(x, norm="forward")))


def test_moves_montgomery_towards_shenzhen(two_sites, fitted):
    mont, shen = _site(two_sites, "montgomery"), _site(two_sites, "shenzhen")
    out = fitted.transform(mont)
    assert all(y.dtype == np.float32 and y.shape == x.shape for x, y in zip(mont, out,
                                                                            strict=True))
    pooled = np.concatenate([x.ravel() for x in shen])
    before = wasserstein_distance(np.concatenate([x.ravel() for x in mont]), pooled)
    after = wasserstein_distance(np.concatenate([y.ravel() for y in out]), pooled)
    assert after < 0.55 * before, (before, after)  # measured 0.196 -> 0.087 (x0.44)
    # the DC term is the mean intensity: the 0.18 gap between the sites closes
    assert abs(np.mean(mont) - np.mean(shen)) > 0.15
    assert abs(np.mean(out) - np.mean(shen)) < 0.01
    # strength interpolates the low-frequency amplitude: half-way at 0.5
    half = FourierAmplitudeMatching(strength=0.5).fit(two_sites, "shenzhen")
    ref = half.reference_amplitude_
    for x, y in zip(mont, half.transform(mont), strict=True):
        gap_before = np.abs(_low_amplitude(half, x) - ref).sum()
        gap_after = np.abs(_low_amplitude(half, y) - ref).sum()
        assert gap_after == pytest.approx(0.5 * gap_before, rel=1e-3)
    # the reference site passes through unchanged
    np.testing.assert_array_equal(fitted.transform(shen[:1], ["shenzhen"])[0], shen[0])


def test_keeps_phase_so_edges_do_not_move(two_sites, fitted):
    mont = _site(two_sites, "montgomery")

    def high_pass(x):
        return x - gaussian_filter(x, 4.0)

    corr = [correlation(high_pass(x), high_pass(y))
            for x, y in zip(mont, fitted.transform(mont), strict=True)]
    assert min(corr) > 0.99, corr  # measured min 0.9960, mean 0.9974 (beta=0.01)
    # a one-pixel shift of the same image, for scale, scores far lower
    assert correlation(high_pass(mont[0]), high_pass(np.roll(mont[0], 1, axis=1))) < 0.9


def test_strength_zero_is_identity(two_sites):
    model = FourierAmplitudeMatching(strength=0.0).fit(two_sites, "shenzhen")
    mont = _site(two_sites, "montgomery")
    for x, y in zip(mont, model.transform(mont), strict=True):
        np.testing.assert_allclose(y, x, atol=1e-5)  # measured max 3e-7


def test_save_load_roundtrip(two_sites, tmp_path):
    model = FourierAmplitudeMatching(beta=0.03, strength=0.7).fit(two_sites, "shenzhen")
    model.save(tmp_path / "fa")
    loaded = load_translator(tmp_path / "fa")
    assert isinstance(loaded, FourierAmplitudeMatching) and loaded.kind == "fourier"
    assert loaded.get_config() == model.get_config() and loaded.reference_site_ == "shenzhen"
    images = [x for x, _ in two_sites[:2] + two_sites[-2:]]
    sites = [s for _, s in two_sites[:2] + two_sites[-2:]]
    for a, b in zip(model.transform(images, sites), loaded.transform(images, sites),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_inverted_images_are_flipped_and_small_images_refused(two_sites, fitted):
    mont = _site(two_sites, "montgomery")[:4]
    inverted = [1.0 - x for x in mont]
    for a, b in zip(fitted.transform(mont), fitted.transform(inverted), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)
    keep = FourierAmplitudeMatching(polarity="keep").fit(two_sites, "shenzhen")
    assert np.abs(keep.transform(inverted[:1])[0] - fitted.transform(mont[:1])[0]).mean() > 0.1
    with pytest.raises(ValueError, match="6x300"):  # beta=0.01, grid=256: a 7x7 block
        fitted.transform([np.zeros((6, 300), np.float32)])
    assert fitted.transform([np.zeros((7, 7), np.float32)])[0].shape == (7, 7)


def test_bad_arguments_and_unfitted_fail_clearly():
    with pytest.raises(NotFittedError):
        FourierAmplitudeMatching().transform([np.zeros((16, 16), np.float32)])
    with pytest.raises(ValueError, match="reference site 'x'"):
        FourierAmplitudeMatching().fit([(np.zeros((16, 16)), "a")], reference_site="x")
    for kwargs in ({"beta": 0}, {"strength": 1.5}, {"polarity": "flip"}, {"grid": 4,
                                                                           "beta": 0.4}):
        model = FourierAmplitudeMatching(**kwargs)  # scikit-learn style: stored as given
        assert model.get_params()[next(iter(kwargs))] == next(iter(kwargs.values()))
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=name):  # ... and checked where it is used
            model.fit([(np.zeros((16, 16)), "a")], reference_site="a")
        with pytest.raises(ValueError, match=name):  # set_params refuses, keeps the old value
            FourierAmplitudeMatching().set_params(**kwargs)
