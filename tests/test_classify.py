"""Classifiers: the zoo, the training loop on real X-rays, checkpoints, augmentation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_same_run
from harmonize.classify.config import ModelConfig, TrainConfig, load_config
from harmonize.classify.networks import ARCHITECTURES, Classifier, load_weights
from harmonize.classify.train import fit_classifier, load_classifier, load_images, predict
from harmonize.cli import main
from harmonize.configs import ConfigError
from harmonize.data.transforms import acquisition_augmentation, augment, plain_augmentation


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_gives_one_logit_per_image(arch):
    torch.manual_seed(0)
    out = Classifier(arch, 64).eval()(torch.rand(2, 1, 64, 64))
    assert out.shape == (2,) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def cxr(tb_cxr):
    """20 + 20 real chest X-rays at 64 px; the label is the hospital (an easy real task)."""
    df = pd.read_csv(tb_cxr / "manifest.csv")
    df = pd.concat([g.head(20) for _, g in df.groupby("site")]).reset_index(drop=True)
    x = load_images([str(tb_cxr / p) for p in df["path"]], 64, progress=False)
    return x, (df["site"] == "shenzhen").to_numpy().astype(int)


def test_training_learns_a_real_task_and_is_reproducible(cxr):
    x, y = cxr
    train = np.arange(len(y)) % 4 != 0
    cfg = TrainConfig(epochs=8, batch_size=8, lr=3e-3, progress=False, seed=1)
    model = fit_classifier(x[train], y[train], ModelConfig(arch="cnn", width=8), cfg)
    p = predict(model, x[~train])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[~train], p) >= 0.9
    again = fit_classifier(x[train], y[train], ModelConfig(arch="cnn", width=8), cfg)
    assert_same_run(predict(again, x[~train]), p)
    with pytest.raises(ValueError, match="both classes"):
        fit_classifier(x[:3], np.zeros(3, int), ModelConfig(), cfg)


def test_augmented_training_is_reproducible_too(cxr):
    x, y = cxr
    cfg = TrainConfig(epochs=1, batch_size=8, augment=True, progress=False, balance="sampler")
    a = predict(fit_classifier(x, y, ModelConfig(arch="vit", width=8), cfg), x[:4])
    b = predict(fit_classifier(x, y, ModelConfig(arch="vit", width=8), cfg), x[:4])
    assert_same_run(a, b)


@pytest.mark.parametrize("make", [plain_augmentation, acquisition_augmentation])
def test_augmentation_changes_images_within_range_reproducibly(cxr, make):
    x = cxr[0][0]
    a = [augment(make(64, seed=3), x) for _ in range(2)]
    torch.testing.assert_close(a[0], a[1])
    aug = make(64, seed=3)
    outs = torch.stack([augment(aug, x) for _ in range(16)])
    assert outs.min() >= 0 and outs.max() <= 1
    assert (outs - x).abs().mean() > 0.01  # not a no-op
    assert outs.std(0).mean() > 0.005      # a fresh draw per call


def test_acquisition_augmentation_simulates_other_x_ray_systems(cxr):
    x = cxr[0][0]
    assert TrainConfig(augment=True).augment == "plain"  # older configs' flag
    assert TrainConfig(augment="acquisition").augment == "acquisition"
    from harmonize.data.acquisition import RandCollimation, RandQuantumNoise

    # quantum noise: sd grows with sqrt(signal); sd_at_mid_grey at 0.5
    noise = RandQuantumNoise(prob=1.0, sd_at_mid_grey=(0.02, 0.02))
    noise.set_random_state(0)
    dark, bright = (noise(torch.full((1, 128, 128), v)) - v for v in (0.125, 0.5))
    assert float(bright.std()) == pytest.approx(0.02, rel=0.05)
    assert float(bright.std() / dark.std()) == pytest.approx(2.0, rel=0.1)
    # collimation: constant borders, the middle untouched
    border = RandCollimation(prob=1.0, max_fraction=0.2)
    border.set_random_state(1)
    y = border(x)
    assert torch.equal(y[..., 16:48, 16:48], x[..., 16:48, 16:48])
    top, left = int(border.edges[0] * 64), int(border.edges[2] * 64)
    assert top > 0 and left > 0  # this seed's draw
    assert (y[..., :top, :] == border.value).all() and (y[..., :, :left] == border.value).all()


def test_local_weights_load_and_mismatches_name_the_file(tmp_path):
    model = Classifier("cnn", 64, width=8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.st")
    other = Classifier("cnn", 64, width=8)
    load_weights(other, tmp_path / "w.st")
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(model.eval()(x), other.eval()(x))
    with pytest.raises(ValueError, match="w.st.*do not fit"):
        load_weights(Classifier("cnn", 64, width=16), tmp_path / "w.st")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_weights(other, tmp_path / "nope.safetensors")


def test_train_classifier_command_writes_a_loadable_checkpoint(tb_cxr, tmp_path, capsys):
    df = pd.read_csv(tb_cxr / "manifest.csv")
    df = pd.concat([g.head(6) for _, g in df.groupby(["site", "label"])])
    df["path"] = [str(tb_cxr / p) for p in df["path"]]
    df.drop(columns=["lung_mask"]).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "clf"
    assert main(["train", "classifier", "-q", "--data", str(tmp_path / "m.csv"), "--out",
                 str(out), "--epochs", "1", "--set", "train.batch_size=8"]) == 0
    assert "saved classifier" in capsys.readouterr().out
    model, cfg, meta = load_classifier(out / "model")
    assert cfg["arch"] == "cnn" and cfg["image_size"] == 64
    assert meta["n_images"] == 24 and meta["training_sites"] == {"montgomery": 12,
                                                                  "shenzhen": 12}
    assert meta["positive_label"] == "tb"
    assert (out / "train_log.csv").read_text().startswith("epoch,loss")
    assert main(["train", "classifier", "-q", "--data", str(tmp_path / "m.csv"), "--out",
                 str(out), "--arch", "vgg"]) == 1
    assert "vgg" in capsys.readouterr().err


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(None, {"model.arch": "vgg"})
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, {"train.epochs": 0})
    with pytest.raises(ConfigError, match="data.manifest"):
        load_config(None, {"train.out": str(tmp_path)}).check_ready()


def test_adapt_batchnorm_uses_the_sites_own_statistics():
    from harmonize.classify.train import adapt_batchnorm, predict

    torch.manual_seed(0)
    model = Classifier("cnn", 32, width=4).eval()
    site = torch.rand(16, 1, 32, 32) * 0.3 + 0.6  # a bright site
    adapted = adapt_batchnorm(model, site)
    first = adapted.net.features[1]
    conv = adapted.net.features[0](site)
    assert torch.allclose(first.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.equal(model.net.features[1].running_mean, torch.zeros(4))  # original kept
    # a brighter copy of the site: its own statistics undo most of the offset
    before = np.abs(predict(adapted, site + 0.2) - predict(adapted, site)).mean()
    after = np.abs(predict(adapt_batchnorm(model, site + 0.2), site + 0.2)
                   - predict(adapted, site)).mean()
    assert after < 0.5 * before
