"""CycleGAN: network shapes, config errors before training, a tiny end-to-end run (train,
checkpoint, load, apply, resume), seamless tiling, polarity guard, dtype/range kept."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from conftest import assert_same_run
from harmonize.apply import apply_translator
from harmonize.data.io import read_image
from harmonize.synth import generate, make_phantom
from harmonize.training.device import native_bf16, pick_device
from harmonize.translators import CycleGANTranslator, load_translator
from harmonize.translators.cyclegan import ConfigError, load_config, train_cyclegan
from harmonize.translators.cyclegan.networks import NLayerDiscriminator, ResnetGenerator
from harmonize.translators.cyclegan.train import lr_factor
from harmonize.translators.tiling import (
    pad_to_multiple,
    seam_ratio,
    tile_borders,
    tile_starts,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data.image_size": 64, "model.ngf": 4, "model.n_blocks": 1, "model.ndf": 8,
        "train.steps": 4, "train.decay_steps": 0, "train.batch_size": 2,
        "train.log_every": 1, "train.sample_every": 2, "train.checkpoint_every": 2,
        "train.progress": False, "inference.batch_size": 4}


def _recipe():
    spec = importlib.util.spec_from_file_location("train_cyclegan", ROOT / "recipes" /
                                                  "train_cyclegan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, sites=3, per_site=6, size=64, seed=1, progress=False)
    return out


def _config(synth: Path, out: Path, **extra):
    return load_config(ROOT / "configs/cyclegan/quick.yaml", {
        **TINY, "data.manifest": str(synth / "manifest.csv"), "data.reference_site": "site_a",
        "train.out": str(out), **extra})


@pytest.fixture(scope="module")
def run(synth, tmp_path_factory) -> Path:
    """A 4-step run through the recipe's command line (the code `harmonize train` runs)."""
    out = tmp_path_factory.mktemp("run") / "cg"
    args = ["-q", "--config", str(ROOT / "configs/cyclegan/quick.yaml"),
            "--data", str(synth / "manifest.csv"), "--reference-site", "site_a",
            "--out", str(out), "--set=train.snapshot_every=2"] + [
                f"--set={k}={v}" for k, v in TINY.items()]
    assert _recipe().main(args) == 0
    return out


# --- networks -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(37, 50), (64, 64), (5, 7), (130, 66)])
def test_generator_takes_any_size_after_padding(shape):
    g = ResnetGenerator(ngf=4, n_blocks=1).eval()
    x, size = pad_to_multiple(torch.rand(1, 1, *shape))
    assert x.shape[-2] % 4 == 0 and x.shape[-1] % 4 == 0
    with torch.no_grad():
        y = g(x)[..., :size[0], :size[1]]
    assert y.shape == (1, 1, *shape) and y.abs().max() <= 1
    with pytest.raises(ValueError, match="multiple of 4"):
        g(torch.rand(1, 1, 30, 30))
    # resize-convolution only: no transposed convolution (checkerboard source)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in g.modules())


def test_patchgan_sees_70x70_patches():
    d = NLayerDiscriminator(ndf=4, n_layers=3)
    for i, m in enumerate(d.model):  # instance norm couples all pixels: take it out here
        if isinstance(m, torch.nn.InstanceNorm2d):
            d.model[i] = torch.nn.Identity()
    x = torch.rand(1, 1, 160, 160, requires_grad=True)
    score = d(x)
    score[0, 0, score.shape[2] // 2, score.shape[3] // 2].backward()
    rows, cols = np.nonzero(x.grad[0, 0].abs().numpy() > 0)
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


@pytest.mark.parametrize(("length", "tile", "overlap"), [(256, 64, 16), (300, 128, 32),
                                                         (132, 128, 32), (1000, 256, 64)])
def test_tiles_cover_on_the_stride_grid(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile
    assert all(s % 4 == 0 for s in starts)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_lr_constant_then_linear_to_zero():
    assert [lr_factor(s, 10, 4) for s in (0, 5, 6)] == [1.0, 1.0, 0.8]
    assert lr_factor(10, 10, 4) == 0.0 and lr_factor(3, 10, 0) == 1.0


# --- config -----------------------------------------------------------------------------

def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="multiple of 4"):
        load_config(None, {"data.image_size": 62})
    with pytest.raises(ConfigError, match="PatchGAN needs at least 32"):
        load_config(None, {"data.image_size": 16})
    with pytest.raises(ConfigError, match="model.ngff"):
        load_config(None, {"model.ngff": 8})
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, {"train.steps": "many"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="data.manifest"):
        train_cyclegan(load_config(None, {"train.out": str(tmp_path / "x")}))


@pytest.mark.parametrize(("extra", "message"), [
    ({"data.reference_site": "site_q"}, "site_q"),
    ({"data.sites": ["site_a", "site_z"]}, "site_z"),
    ({"data.sites": ["site_b", "site_c"]}, "add it to data.sites"),
    ({"data.split": "train"}, "no split column"),
])
def test_missing_site_fails_before_training(synth, tmp_path, extra, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train_cyclegan(_config(synth, out, **extra))
    assert not (out / "state").exists() and not (out / "model").exists()
    assert _recipe().main(["-q", "--data", str(synth / "manifest.csv"), "--reference-site",
                           "site_q", "--out", str(tmp_path / "cli")]) == 1


# --- a tiny run end to end ----------------------------------------------------------------

def test_run_writes_a_loadable_checkpoint(run, synth, tmp_path):
    assert sorted(p.name for p in (run / "model").iterdir()) == [
        "config.json", "metadata.json", "model.safetensors"]
    meta = json.loads((run / "model" / "metadata.json").read_text())
    assert meta["reference_site"] == "site_a" and meta["image_size"] == 64
    assert meta["steps"] == 4 and meta["source_sites"] == ["site_b", "site_c"]
    assert meta["training_sites"] == {"site_a": 6, "site_b": 6, "site_c": 6}
    assert set(meta["polarity_flipped"]) <= {"site_b", "site_c"}
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step_0000002.png", "step_0000004.png"]
    log = pd.read_csv(run / "train_log.csv")
    assert list(log["step"]) == [1, 2, 3, 4] and log["cycle"].notna().all()
    # snapshots to choose from without labels; the last one is the final model
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "step_0000002", "step_0000004"]
    assert (run / "snapshots" / "step_0000004" / "model.safetensors").read_bytes() == (
        run / "model" / "model.safetensors").read_bytes()

    translator = load_translator(run / "model")
    assert isinstance(translator, CycleGANTranslator) and translator.tile_size == 64
    summary = apply_translator(translator, synth / "manifest.csv", tmp_path / "out",
                               progress=False)
    assert (summary.ok, summary.errors) == (18, 0)
    df = pd.read_csv(synth / "manifest.csv")
    for rel, site in zip(df["path"], df["site"], strict=True):
        a, b = read_image(synth / rel), read_image(tmp_path / "out" / rel)
        assert b.array.dtype == a.array.dtype and b.array.shape == a.array.shape
        assert b.value_range == a.value_range and b.array.max() <= a.value_range[1]
        if site == "site_a":  # the reference site passes through untouched
            np.testing.assert_array_equal(a.array, b.array)


def test_resume_continues_exactly(synth, tmp_path):
    """2 steps + resume to 4 gives the weights of 4 straight steps (seeded, RNG restored)."""
    straight = train_cyclegan(_config(synth, tmp_path / "a"))
    train_cyclegan(_config(synth, tmp_path / "b", **{"train.steps": 2}))
    with pytest.raises(ConfigError, match="--resume"):
        train_cyclegan(_config(synth, tmp_path / "b"))
    with pytest.raises(ConfigError, match="model"):
        train_cyclegan(_config(synth, tmp_path / "b", **{"model.ngf": 8, "train.resume": True}))
    with pytest.raises(ConfigError, match="source sites"):
        train_cyclegan(_config(synth, tmp_path / "b", **{"train.resume": True,
                                                         "data.sites": ["site_a", "site_b"]}))
    resumed = train_cyclegan(_config(synth, tmp_path / "b", **{"train.resume": True}))
    assert json.loads((resumed / "metadata.json").read_text())["steps"] == 4
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


# --- inference --------------------------------------------------------------------------

def test_tiled_apply_has_no_seams(run):
    """An image 4x the training size: blended tiles leave no trace at their borders;
    the same model with hard (non-overlapping) tiles does, so the measure can see seams."""
    x = make_phantom("xray", 256, True, np.random.default_rng(0)).ideal
    x = ((x - x.min()) / (x.max() - x.min())).astype(np.float32)
    translator = load_translator(run / "model")
    blended = translator.transform([x])[0]
    edges = tile_borders(256, 64, translator.tile_overlap)
    assert translator.tile_size == 64 and edges == [48, 64, 96, 112, 144, 160, 192, 208]
    translator.tile_overlap = 0.0
    hard = translator.transform([x])[0]
    ratio_blended = seam_ratio(blended, x, edges)
    ratio_hard = seam_ratio(hard, x, tile_borders(256, 64, 0.0))
    print(f"seam ratio blended {ratio_blended:.3f}, hard tiles {ratio_hard:.3f}")
    assert 0.8 < ratio_blended < 1.2, ratio_blended
    assert ratio_hard > 1.5, ratio_hard


def test_polarity_guard_and_precision(run):
    translator = load_translator(run / "model")
    rng = np.random.default_rng(0)
    x = make_phantom("xray", 64, False, rng).ideal.astype(np.float32)
    x = (x - x.min()) / (x.max() - x.min())
    assert translator.precision == "auto"  # the configs' default
    translator.precision = "fp32"
    y, y_inverted = translator.transform([x, 1.0 - x])
    np.testing.assert_allclose(y, y_inverted, atol=1e-4)  # flipped before the generator
    translator.precision = "bf16"
    y_bf16 = translator.transform([x])[0]
    assert y_bf16.dtype == np.float32 and np.abs(y_bf16 - y).mean() < 0.02
    translator.precision = "auto"  # bf16 where the device runs it natively, else fp32
    y_auto = translator.transform([x])[0]
    # the device the translator actually used; kernels may pick other reduction orders
    # between calls (seen on CPU: 4e-7), far below the bf16/fp32 difference
    expected = y_bf16 if native_bf16(pick_device(translator.device)) else y
    np.testing.assert_allclose(y_auto, expected, atol=1e-4)
    assert np.abs(y_auto - expected).mean() < 0.1 * np.abs(y_bf16 - y).mean()


def test_apply_keeps_dtype_and_range(run, tmp_path):
    """8-bit, 12-bit-in-16 and 16-bit inputs larger than the tile come back in kind."""
    inp = tmp_path / "in"
    inp.mkdir()
    x = make_phantom("xray", 150, False, np.random.default_rng(3)).ideal
    x = (x - x.min()) / (x.max() - x.min())
    arrays = {"u8.png": np.rint(x * 255).astype(np.uint8),
              "u12.png": np.rint(x * 4095).astype(np.uint16),
              "u16.tif": np.rint(x * 65535).astype(np.uint16)}
    for name, arr in arrays.items():
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(inp / name))
    summary = apply_translator(load_translator(run / "model"), inp, tmp_path / "out",
                               progress=False)
    assert summary.ok == 3
    for name, arr in arrays.items():
        out = read_image(tmp_path / "out" / name)
        assert out.array.dtype == arr.dtype and out.array.shape == arr.shape
        assert out.array.max() <= {"u8.png": 255, "u12.png": 4095, "u16.tif": 65535}[name]


def test_apply_precision_flag_turns_bf16_off(run, tmp_path):
    """`harmonize apply --precision fp32` writes what an fp32 translator writes."""
    from harmonize.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    x = make_phantom("xray", 64, False, np.random.default_rng(5)).ideal
    x = (x - x.min()) / (x.max() - x.min())
    sitk.WriteImage(sitk.GetImageFromArray(np.rint(x * 4095).astype(np.uint16)),
                    str(inp / "a.png"))
    translator = load_translator(run / "model")
    translator.precision = "fp32"
    apply_translator(translator, inp, tmp_path / "api", progress=False)
    for precision in ("fp32", "bf16"):
        assert main(["apply", "-q", "--model", str(run / "model"), "--precision", precision,
                     str(inp), str(tmp_path / precision)]) == 0
    fp32 = read_image(tmp_path / "fp32" / "a.png").array
    assert_same_run(fp32, read_image(tmp_path / "api" / "a.png").array, atol=1)  # 1 level
    bf16 = read_image(tmp_path / "bf16" / "a.png").array
    assert not np.array_equal(fp32, bf16)  # the flag does change the arithmetic
    assert np.abs(fp32.astype(float) - bf16.astype(float)).mean() < 0.02 * 4095


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rule")
def test_training_precision_auto_follows_native_bf16():
    from harmonize.training.device import training_precision

    assert training_precision("no") == "no" and training_precision("bf16") == "bf16"
    assert training_precision("auto") == ("bf16" if native_bf16("cpu") else "no")
    assert training_precision("auto", cpu_bf16=False) == "no"  # classifiers: fp32 on CPU


def test_snapshot_choice_holds_out_reference_and_other_patients_in_many_hospitals():
    """60 hospitals, the reference 2% of the patients: both kinds still held out, by
    patient (the femur72 study's histogram-residual training failed on this)."""
    from harmonize.translators.cyclegan.data import held_out_rows

    rows = [{"patient_id": f"{s}_{p}", "site": s, "label": "ab"[p % 2]}
            for s in [f"site_{k}" for k in range(60)] for p in range(16)
            for _ in range(1 + p % 3)]  # several images per patient
    df = pd.DataFrame(rows)
    held = held_out_rows(df, "site_0", 0.1, seed=0)
    assert (df.loc[held, "site"] == "site_0").any() and (df.loc[held, "site"] != "site_0").any()
    assert not set(df.loc[held, "patient_id"]) & set(df.loc[~held, "patient_id"])
    assert 0.05 < df.loc[held, "patient_id"].nunique() / df["patient_id"].nunique() < 0.15
