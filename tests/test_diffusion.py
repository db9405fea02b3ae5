"""Diffusion translator: the DDIM inversion/generation arithmetic, determinism, config
errors before training, train -> checkpoint -> apply -> resume, larger-than-training images.

Everything runs on tiny UNets (16 px, a few thousand parameters) so the file stays fast
on a CPU; what is tested is the loop arithmetic and the plumbing, not image quality
(that is `eval/diffusion_fidelity.py`).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from conftest import assert_same_run
from harmonize.apply import apply_translator
from harmonize.data.io import read_image
from harmonize.data.manifest import load_manifest
from harmonize.training.device import native_bf16, pick_device
from harmonize.translators import TRANSLATORS, load_translator
from harmonize.translators.diffusion import (
    ConfigError,
    DiffusionTranslator,
    load_config,
    train_diffusion,
)
from harmonize.translators.diffusion import sampling as smp
from harmonize.translators.diffusion.data import crop

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon",
         "clip_sample": False}
TINY = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
        "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
        "add_attention": False, "num_class_embeds": None}
TINY_OVERRIDES = {"data.image_size": 16, "model.block_out_channels": [8, 16],
                  "model.layers_per_block": 1,
                  "model.attention": [False, False], "model.norm_num_groups": 4,
                  "train.batch_size": 4, "train.lr_warmup_steps": 0, "train.log_every": 1,
                  "train.sample_every": 2, "train.checkpoint_every": 2, "train.progress": False,
                  "inference.steps": 5, "inference.batch_size": 4}


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    """`load_translator` must know the kind (until the registry line lands; harmless after)."""
    monkeypatch.setitem(TRANSLATORS, "diffusion", DiffusionTranslator)


def gaussian_oracle(scheduler, sigma: float):
    """The exact noise predictor for data ~ N(0, sigma^2): eps = sqrt(1-a) x / (a s^2 + 1-a).
    Its probability-flow ODE is linear, so DDIM is exact in the limit of many steps."""

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        a = float(scheduler.alphas_cumprod[t])
        return math.sqrt(1 - a) * x / (a * sigma**2 + 1 - a)

    return eps


def blobs(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """Smooth discs in [-0.8, 0.8]: something a tiny prior learns in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    c = torch.rand(n, 2, 1, 1, generator=g) - 0.5
    r = torch.rand(n, 1, 1, generator=g) * 0.3 + 0.3
    disc = (((xx - c[:, 0]) ** 2 + (yy - c[:, 1]) ** 2) < r**2).float()[:, None]
    return F.avg_pool2d(F.pad(disc, (1, 1, 1, 1), mode="replicate"), 3, 1) * 1.6 - 0.8


@pytest.fixture(scope="module")
def trained_unet() -> UNet2DModel:
    torch.manual_seed(0)
    unet = UNet2DModel(**{**TINY, "block_out_channels": [16, 32], "norm_num_groups": 8})
    ddpm = DDPMScheduler(**SCHED)
    opt = torch.optim.AdamW(unet.parameters(), 2e-3)
    for step in range(200):
        x = blobs(16, step)
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (16,))
        loss = F.mse_loss(unet(ddpm.add_noise(x, noise, t), t).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return unet.eval()


# --- the arithmetic -----------------------------------------------------------------------
def test_inversion_mirrors_generation_exactly_in_the_limit():
    """With the exact eps of Gaussian data, invert-then-generate converges to the input as
    steps grow (an off-by-one in the timestep pairs would not converge), and fixed-point
    refinement removes most of the remaining error."""
    s = smp.ddim_scheduler(SCHED)
    eps = gaussian_oracle(s, 0.5)
    x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    errors = {}
    for steps, refine in [(10, 0), (50, 0), (200, 0), (20, 3)]:
        ts = smp.timesteps_for(s, steps, 1.0)
        latent = smp.ddim_invert(eps, x0, s, ts, refine)
        errors[steps, refine] = float((smp.ddim_generate(eps, latent, s, ts) - x0).abs().max())
    assert errors[10, 0] > errors[50, 0] > errors[200, 0]
    assert errors[200, 0] < 0.08  # first order: ~ 12 / steps here
    assert errors[20, 3] < 0.01
    assert ts[0] == 999 and s.num_inference_steps == 20  # trailing: starts from pure noise


def test_inversion_then_generation_reconstructs_with_a_trained_unet(trained_unet):
    s = smp.ddim_scheduler(SCHED)
    eps = smp.unet_eps(trained_unet)
    x0 = blobs(4, seed=999)
    ts = smp.timesteps_for(s, 50, 1.0)
    errors = []
    for refine, mean_bound, max_bound in [(0, 0.06, 0.4), (1, 0.02, 0.2)]:
        latent = smp.ddim_invert(eps, x0, s, ts, refine)
        err = (smp.ddim_generate(eps, latent, s, ts) - x0).abs()  # data range: 1.6
        assert float(err.mean()) < mean_bound and float(err.max()) < max_bound
        errors.append(float(err.mean()))
    assert errors[1] < errors[0] / 2  # one fixed-point correction per step helps
    assert 0.8 < float(latent.std()) < 1.2  # the latent looks like noise


def test_timesteps_and_step_count_checks():
    s = smp.ddim_scheduler(SCHED)
    assert smp.timesteps_for(s, 20, 0.5) == [499 - 50 * k for k in range(10)]
    assert smp.timesteps_for(s, 5, 0.1) == [199]  # at least one step
    with pytest.raises(ValueError, match="must divide"):
        smp.timesteps_for(s, 30, 0.5)
    with pytest.raises(ValueError, match="t0"):
        smp.timesteps_for(s, 20, 0.0)


# --- the translator -----------------------------------------------------------------------
def tiny_translator(**kw) -> DiffusionTranslator:
    torch.manual_seed(0)
    sites = kw.pop("sites", ["site_a", "site_b"])
    t = DiffusionTranslator(unet_config=TINY, scheduler_config=SCHED, class_sites=sites,
                            steps=5, batch_size=2, **kw)
    return t.set_trained({s: UNet2DModel(**TINY) for s in sites}, np.ones((32, 32)) * 0.5
                         + np.linspace(0, 0.1, 32)[None], "site_a")


def test_translation_is_deterministic_for_a_seed_whatever_the_batch():
    rng = np.random.default_rng(0)
    images = [rng.random((16, 16), dtype=np.float32) for _ in range(3)]
    for mode in ("sdedit", "ddib"):
        t = tiny_translator(mode=mode, polarity="keep")
        a = t.transform(images, ["site_b"] * 3)
        b = t.transform(images[2:], ["site_b"])  # other batch composition
        assert all(x.dtype == np.float32 and x.shape == (16, 16) for x in a)
        np.testing.assert_allclose(a[2], b[0], atol=1e-5)
        assert_same_run(a[0], t.transform(images, ["site_b"] * 3)[0])
    other = tiny_translator(mode="sdedit", polarity="keep", seed=1).transform(images[:1])
    t = tiny_translator(mode="sdedit", polarity="keep")
    assert np.abs(other[0] - t.transform(images[:1])[0]).max() > 1e-3
    assert t.transform(images[:1], ["site_a"])[0] is not images[0]  # reference: passthrough
    np.testing.assert_array_equal(t.transform(images[:1], ["site_a"])[0], images[0])
    # precision "auto" (harmonize apply --precision auto) = bf16 where native, else fp32
    fp32 = t.set_params(precision="fp32").transform(images[:1])[0]  # the default is auto
    t.set_params(precision="auto")
    auto = t.transform(images[:1])[0]
    if native_bf16(pick_device(t.device)):  # the device the translator actually used
        assert 0 < np.abs(auto - fp32).max() < 0.1
    else:
        assert_same_run(auto, fp32)


def test_ddib_without_a_model_for_the_site_falls_back_to_sdedit(caplog):
    x = [np.random.default_rng(1).random((16, 16), dtype=np.float32)]
    t = tiny_translator(mode="ddib", polarity="keep")
    with caplog.at_level("WARNING"):
        out = t.transform(x, ["site_z"])
    assert "site_z" in caplog.text
    sde = t.set_params(mode="sdedit").transform(x, ["site_z"])
    np.testing.assert_allclose(out[0], sde[0], atol=1e-6)
    with pytest.raises(ValueError, match="t0"):
        t.set_params(sdedit_t0=1.5)
    with pytest.raises(ValueError, match="must divide"):
        t.set_params(steps=30)
    assert (t.sdedit_t0, t.steps) == (0.4, 5)  # unchanged by the refused settings


def test_larger_images_keep_their_own_detail():
    """A 4x image: the residual path returns exactly the input when the translation at
    training size changes nothing; when it changes the intensities, the output takes the
    new intensities and keeps the input's fine detail ('resize' loses that detail)."""
    rng = np.random.default_rng(2)
    big = (0.5 + 0.2 * np.sin(np.arange(64) / 3.0)[None] + 0.05 * rng.standard_normal((64, 64))
           ).astype(np.float32)
    t = tiny_translator(mode="sdedit", polarity="keep")
    t.translate_at_size = lambda x, sites: x  # a no-op at 16 px
    np.testing.assert_allclose(t.transform([big])[0], big, atol=1e-5)

    t.translate_at_size = lambda x, sites: 0.1 + 0.6 * x**2  # a new response curve
    out = t.transform([big])[0]
    assert out.shape == (64, 64) and out.dtype == np.float32

    def highpass(x: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(x)[None, None]
        return (x - F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="bilinear"))[0, 0]

    def corr(a, b) -> float:
        return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])

    assert corr(highpass(out), highpass(big)) > 0.9  # native detail kept
    assert abs(float(out.mean()) - float((0.1 + 0.6 * big**2).mean())) < 0.01  # new style
    smooth = t.set_params(large_images="resize").transform([big])[0]
    assert corr(highpass(smooth), highpass(big)) < 0.5
    assert corr(smooth, 0.1 + 0.6 * big**2) > 0.8


def test_tiles_cover_native_resolution_images():
    """large_images='tiles' (priors trained on crops): padding, tiling and blending give
    back every pixel of images larger and smaller than the tile, deterministically."""
    rng = np.random.default_rng(3)
    images = [rng.random((40, 56), dtype=np.float32), rng.random((10, 12), dtype=np.float32)]
    t = tiny_translator(mode="sdedit", polarity="keep", large_images="tiles")
    out = t.transform(images, ["site_b", "site_b"])
    assert [y.shape for y in out] == [(40, 56), (10, 12)]
    # batch composition changes float summation order in the convolutions, nothing more
    np.testing.assert_allclose(out[0], t.transform(images[:1], ["site_b"])[0], atol=1e-5)
    t._run = lambda batch, site, ddib: batch  # no-op on every 16 px tile
    for x, y in zip(images, t.transform(images, ["site_b", "site_b"]), strict=True):
        np.testing.assert_allclose(y, x, atol=1e-5)
    x = torch.arange(12.0).reshape(1, 3, 4)
    assert crop(x, 2, None).shape == (1, 2, 2)
    assert crop(x, 5, np.random.default_rng(0)).shape == (1, 5, 5)  # padded, then cropped


# --- config and training ------------------------------------------------------------------
def test_config_errors_name_every_bad_key():
    with pytest.raises(ConfigError) as err:  # field checks: all at once
        load_config(None, {"inference.sdedit_t0": 2, "train.batch_size": 0, "model.typo": 1})
    for key in ("inference.sdedit_t0", "train.batch_size", "model.typo"):
        assert key in str(err.value)
    with pytest.raises(ConfigError) as err:  # then the checks across fields, all at once
        load_config(None, {"data.image_size": 30, "model.attention": [True],
                           "inference.steps": 30})
    for key in ("data.image_size", "model.attention", "inference.steps"):
        assert key in str(err.value)
    with pytest.raises(ConfigError, match="data.scale"):
        load_config(None, {"inference.large_images": "tiles"})  # tiles need a crop prior


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from harmonize.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, sites=3, per_site=4, size=48, seed=0, progress=False)
    return out


def test_bad_data_fails_before_training(synth, tmp_path):
    base = {**TINY_OVERRIDES, "data.manifest": str(synth / "manifest.csv"),
            "train.out": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match="site_x"):
        train_diffusion(load_config(None, {**base, "data.reference_site": "site_x"}))
    with pytest.raises(ConfigError, match="only the reference site"):
        train_diffusion(load_config(None, {**base, "data.reference_site": "site_a",
                                           "data.sites": ["site_a"], "inference.mode": "ddib"}))
    with pytest.raises(ConfigError, match="misses data.reference_site"):
        train_diffusion(load_config(None, base))
    assert not (tmp_path / "run" / "state").exists()


def test_train_checkpoint_apply_resume(synth, tmp_path):
    run = tmp_path / "run"
    overrides = {**TINY_OVERRIDES, "data.manifest": str(synth / "manifest.csv"),
                 "data.reference_site": "site_a", "inference.mode": "ddib",
                 "train.out": str(run), "train.steps": 2}
    model_dir = train_diffusion(load_config(None, overrides))
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert meta["model_sites"] == ["site_a", "site_b", "site_c"]
    assert meta["training_sites"] == {"site_a": 4, "site_b": 4, "site_c": 4}
    assert meta["steps"] == 2 and meta["image_size"] == 16
    assert meta["training_manifest_sha256"] and meta["intensity_policy"]
    assert (run / "samples" / "step_0000002.png").is_file()

    translator = load_translator(model_dir)
    assert isinstance(translator, DiffusionTranslator) and translator.mode == "ddib"
    summary = apply_translator(translator, synth / "manifest.csv", tmp_path / "out",
                               batch_size=5, progress=False)
    assert summary.ok == 12 and summary.errors == 0
    rows = load_manifest(synth / "manifest.csv")
    policy = translator.policy
    for rel in rows[rows["site"] != "site_a"]["relpath"]:
        a, b = read_image(synth / rel), read_image(tmp_path / "out" / rel)
        assert b.array.dtype == a.array.dtype and b.array.shape == a.array.shape == (48, 48)
        xa, xb = policy.to_model(a)[0], policy.to_model(b)[0]  # same window, same range
        assert xb.min() >= 0 and xb.max() <= 1 and np.abs(xa - xb).mean() > 1e-3

    with pytest.raises(ConfigError, match="--resume"):
        train_diffusion(load_config(None, overrides))
    train_diffusion(load_config(None, {**overrides, "train.steps": 4, "train.resume": True}))
    assert json.loads((model_dir / "metadata.json").read_text())["steps"] == 4
    straight = train_diffusion(load_config(None, {**overrides, "train.steps": 4,
                                                  "train.out": str(tmp_path / "straight")}))
    resumed, uninterrupted = (load_file(d / "model.safetensors") for d in (model_dir, straight))
    for k in resumed:  # seeded: exact on the CPU
        assert_same_run(resumed[k], uninterrupted[k])
    steps = [int(line.split(",")[0]) for line in
             (run / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="model"):
        train_diffusion(load_config(None, {**overrides, "train.steps": 6, "train.resume": True,
                                           "model.layers_per_block": 2}))


def test_recipe_trains_one_site_conditioned_model(synth, tmp_path):
    """The recipe's flags (shared with `harmonize train diffusion`) override the config;
    a site-conditioned prior serves DDIB for known and unknown sites alike."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "train_diffusion.py"
    spec = importlib.util.spec_from_file_location("train_diffusion_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY_OVERRIDES.items()]
    argv = ["-q", "--data", str(synth / "manifest.csv"), "--reference-site", "site_a",
            "--mode", "ddib", "--site-conditioned", "--out", str(tmp_path / "run"),
            "--steps", "2", *sets]
    assert recipe.main(argv) == 0
    t = load_translator(tmp_path / "run" / "model")
    assert t.conditioned and t.model_sites == ["*"] and t.class_sites == [
        "site_a", "site_b", "site_c"]
    x = np.random.default_rng(0).random((20, 24), dtype=np.float32)
    out = t.transform([x, x], ["site_b", "elsewhere"])  # "elsewhere": the unknown-site class
    assert out[0].shape == (20, 24) and not np.allclose(out[0], out[1])
    assert recipe.main([*argv[:-len(sets)], "--set", "inference.steps=7"]) == 1
