"""The histogram-residual translator: at step 0 exactly histogram matching, a tiny run
through `harmonize train histogram-residual` that writes a loadable checkpoint of its own
kind, and the config refusals that keep it starting from histogram matching."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from harmonize.apply import apply_translator
from harmonize.cli import build_parser
from harmonize.cli import main as cli_main
from harmonize.data.fingerprints import remove_fingerprints
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import read_image
from harmonize.fit import model_space_images
from harmonize.synth import generate
from harmonize.translators import HistogramMatching, HistogramResidualTranslator, load_translator
from harmonize.translators.cyclegan import ConfigError, command, load_config
from harmonize.translators.cyclegan.networks import ResnetGenerator, init_weights

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/histogram_residual/quick.yaml"
TINY = {"data.image_size": 64, "model.ngf": 4, "model.n_blocks": 1, "model.ndf": 8,
        "train.steps": 3, "train.decay_steps": 0, "train.batch_size": 2,
        "train.log_every": 1, "train.sample_every": 3, "train.checkpoint_every": 3,
        "train.progress": False, "inference.batch_size": 4, "train.select_fraction": 0}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, sites=3, per_site=6, size=64, seed=2, progress=False)
    return out


@pytest.fixture(scope="module")
def images(synth):
    df = pd.read_csv(synth / "manifest.csv")
    df["path"] = [str(synth / p) for p in df["path"]]
    return list(model_space_images(df, IntensityPolicy(), progress=False))


def test_additive_generator_starts_as_the_identity():
    g = init_weights(ResnetGenerator(ngf=4, n_blocks=1, residual="additive"))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.equal(g(x), x)
    # it can learn: the zero head still receives a gradient
    g(x).sum().backward()
    assert g.head[-1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("per", ["image", "site"])
def test_untrained_translator_is_histogram_matching(images, per):
    hm = HistogramMatching(per=per).fit(images, "site_a")
    t = HistogramResidualTranslator(ngf=4, n_blocks=1, tile_size=64, landmarks_per=per,
                                    precision="fp32")
    g = init_weights(ResnetGenerator(ngf=4, n_blocks=1, residual="additive"))
    t.set_trained(g, hm.template_, "site_a", hm)
    xs, sites = [x for x, _ in images], [s for _, s in images]
    expected = hm.transform(xs, sites)
    for got, want, site in zip(t.transform(xs, sites), expected, sites, strict=True):
        # the network works in [-1, 1]: exact up to float rounding, clipped to [0, 1]
        np.testing.assert_allclose(got, np.clip(want, 0, 1), atol=1e-6)
        if site == "site_a":
            assert np.array_equal(got, want)


def test_set_trained_needs_the_landmarks(images):
    t = HistogramResidualTranslator(ngf=4, n_blocks=1)
    g = ResnetGenerator(ngf=4, n_blocks=1, residual="additive")
    with pytest.raises(ValueError, match="HistogramMatching"):
        t.set_trained(g, np.zeros((32, 32), np.float32), "site_a")


def test_train_apply_and_reload(synth, images, tmp_path, capsys):
    out = tmp_path / "hr"
    args = ["train", "histogram-residual", "--config", str(CONFIG), "--data",
            str(synth / "manifest.csv"), "--reference-site", "site_a", "--out", str(out)]
    sets = {**TINY, "train.log_with": "tensorboard"}
    assert cli_main(args + [f"--set={k}={v}" for k, v in sets.items()]) == 0
    assert "saved histogram-residual translator" in capsys.readouterr().out
    # the curves and the sample grid reach TensorBoard, beside the CSV log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    cycle = [e.value for e in events.Scalars("cycle")]
    log = pd.read_csv(out / "train_log.csv")
    np.testing.assert_allclose(cycle, log["cycle"], atol=1e-5)
    assert cycle[0] == 0  # step 1: both generators are the identity, the cycle exact
    assert [e.step for e in events.Images("samples")] == [3]
    meta = json.loads((out / "model" / "metadata.json").read_text())
    assert meta["steps"] == 3 and meta["source_sites"] == ["site_b", "site_c"]
    t = load_translator(out / "model")
    assert isinstance(t, HistogramResidualTranslator) and t.landmarks_per == "image"
    # the saved landmarks are the ones fitted on the training rows
    hm = HistogramMatching().fit(images, "site_a")
    np.testing.assert_allclose(t.landmarks_.reference_quantiles_, hm.reference_quantiles_,
                               atol=1e-6)
    # three steps moved the generator off histogram matching, but only a little
    xs = [x for x, s in images if s != "site_a"]
    moved = np.mean([np.abs(a - np.clip(b, 0, 1)).mean()
                     for a, b in zip(t.transform(xs), hm.transform(xs), strict=True)])
    assert 0 < moved < 0.05
    summary = apply_translator(t, synth / "manifest.csv", tmp_path / "apply", progress=False)
    assert (summary.ok, summary.errors) == (18, 0)
    first = pd.read_csv(synth / "manifest.csv")["path"][0]
    a, b = read_image(synth / first), read_image(tmp_path / "apply" / first)
    assert a.array.dtype == b.array.dtype and np.array_equal(a.array, b.array)  # reference


def test_a_plain_cyclegan_config_is_refused(synth, tmp_path):
    args = ["train", "histogram-residual", "--config", str(ROOT / "configs/cyclegan/quick.yaml"),
            "--data", str(synth / "manifest.csv"), "--reference-site", "site_a",
            "--out", str(tmp_path / "x")]
    with pytest.raises(ConfigError, match="no landmarks section"):
        command.config_from_args(build_parser().parse_args(args), "histogram-residual")


def test_landmarks_need_the_additive_generator():
    with pytest.raises(ConfigError, match="model.residual"):
        load_config(CONFIG, {"model.residual": True})
    assert load_config(CONFIG).kind == "histogram-residual"
    assert load_config(ROOT / "configs/cyclegan/quick.yaml").kind == "cyclegan"


def test_unlabelled_choice_among_snapshots(synth, tmp_path, capsys):
    """Held-out patients score every snapshot (step 0 = histogram matching included) and
    histogram matching itself; the lowest score becomes OUT/model."""
    out = tmp_path / "hr"
    sets = {**TINY, "train.snapshot_every": 1, "train.select_fraction": 0.34}
    args = ["train", "histogram-residual", "--config", str(CONFIG), "--data",
            str(synth / "manifest.csv"), "--reference-site", "site_a", "--out", str(out)]
    assert cli_main(args + [f"--set={k}={v}" for k, v in sets.items()]) == 0
    printed = capsys.readouterr().out
    scores = pd.read_csv(out / "selection.csv")
    assert list(scores["step"]) == ["histogram-matching", "0", "1", "2", "3"]
    snapshots = scores[scores["step"] != "histogram-matching"]
    best = snapshots.loc[snapshots["score"].idxmin()]
    meta = json.loads((out / "model" / "metadata.json").read_text())
    assert meta["selection"]["step"] == int(best["step"])
    chosen = out / "snapshots" / f"step_{int(best['step']):07d}" / "model.safetensors"
    assert (out / "model" / "model.safetensors").read_bytes() == chosen.read_bytes()
    assert f"selected step {int(best['step'])} without labels" in printed
    # the held-out patients were not trained on
    trained = meta["training_sites"]
    heldout = meta["selection"]["heldout_images"]
    assert heldout >= 3 and sum(trained.values()) + heldout == 18
    assert min(trained.values()) >= 3
    # step 0 is histogram matching: its intensity distance equals the baseline's
    base = scores[scores["step"] == "histogram-matching"].iloc[0]
    start = scores[scores["step"] == "0"].iloc[0]
    assert abs(start["intensity_distance"] - base["intensity_distance"]) < 1e-3


def test_films_with_a_large_dark_field_are_not_flipped(tb_cxr, two_sites):
    """Two real Montgomery films with a black band and dark air over a third of the image:
    their contrast-changed landmark mapping anti-correlated with Shenzhen's mean image, and
    a second polarity check before the generator flipped them (structure -0.92)."""
    shenzhen = [(x, s) for x, s in two_sites if s == "shenzhen"]
    hm = HistogramMatching(per="image").fit(shenzhen, "shenzhen")
    t = HistogramResidualTranslator(ngf=4, n_blocks=1, tile_size=256, precision="fp32",
                                    fingerprints="remove")
    t.set_trained(init_weights(ResnetGenerator(ngf=4, n_blocks=1, residual="additive")),
                  hm.template_, "shenzhen", hm)
    policy = IntensityPolicy()
    films = [policy.to_model(read_image(tb_cxr / f"montgomery/normal/MCUCXR_00{n}_0.png"))[0]
             for n in (42, 52)]
    mapped = hm.transform([remove_fingerprints(x)[0] for x in films], ["montgomery"] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does the output check call it inverted
        outputs = t.transform(films, ["montgomery"] * 2)
    for film, want, out in zip(films, mapped, outputs, strict=True):
        # untrained, it is fingerprint removal + histogram matching, not its negative
        np.testing.assert_allclose(out, np.clip(want, 0, 1), atol=1e-6)
        assert np.corrcoef(film.ravel(), out.ravel())[0, 1] > 0.5
