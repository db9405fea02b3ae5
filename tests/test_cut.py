"""CUT (contrastive unpaired translation): PatchNCE rewards keeping the source's patches
where they were, a tiny run through `harmonize train cut` writes a loadable "cut"
checkpoint, and a config of another kind is refused."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from harmonize.apply import apply_translator
from harmonize.cli import build_parser
from harmonize.cli import main as cli_main
from harmonize.synth import generate
from harmonize.translators import CUTTranslator, load_translator
from harmonize.translators.cyclegan import ConfigError, command
from harmonize.translators.cyclegan.losses import LossWeights, patchnce_term
from harmonize.translators.cyclegan.networks import (
    PatchProjection,
    ResnetGenerator,
    init_weights,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/cut/quick.yaml"
TINY = {"data.image_size": 64, "model.ngf": 4, "model.n_blocks": 2, "model.ndf": 8,
        "train.steps": 3, "train.decay_steps": 0, "train.batch_size": 2,
        "train.log_every": 1, "train.sample_every": 3, "train.checkpoint_every": 3,
        "train.progress": False, "inference.batch_size": 4, "loss.nce_patches": 32}


def test_patchnce_prefers_patches_kept_in_place():
    torch.manual_seed(0)
    g = init_weights(ResnetGenerator(ngf=8, n_blocks=2))
    h = init_weights(PatchProjection(g.feature_channels()))
    assert len(g.encode(torch.zeros(1, 1, 32, 32))) == len(g.feature_channels()) == 5
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    w = LossWeights(nce_patches=64)
    kept = patchnce_term(g, h, x, x, w, torch.Generator().manual_seed(1))
    moved = patchnce_term(g, h, x, torch.roll(x, (9, 13), dims=(2, 3)), w,
                          torch.Generator().manual_seed(1))
    assert float(kept.detach()) < float(moved.detach())
    # the loss trains G through the translation and H (the source side is detached)
    out = g(x)
    patchnce_term(g, h, x, out, w).backward()
    assert g.head[-1].weight.grad.abs().sum() > 0 and h.heads[0][0].weight.grad is not None


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, sites=3, per_site=6, size=64, seed=4, progress=False)
    return out


def test_train_cut_writes_a_cut_checkpoint(synth, tmp_path, capsys):
    out = tmp_path / "cut"
    args = ["train", "cut", "--config", str(CONFIG), "--data", str(synth / "manifest.csv"),
            "--reference-site", "site_a", "--out", str(out)]
    assert cli_main(args + [f"--set={k}={v}" for k, v in TINY.items()]) == 0
    assert "saved cut translator" in capsys.readouterr().out
    log = pd.read_csv(out / "train_log.csv")
    assert list(log.columns[3:]) == ["G_gan", "nce", "nce_idt", "D_B", "inv"]
    assert log["nce"].notna().all() and (log["nce"] > 0).all()
    t = load_translator(out / "model")
    assert isinstance(t, CUTTranslator) and t.kind == "cut"
    summary = apply_translator(t, synth / "manifest.csv", tmp_path / "apply", progress=False)
    assert (summary.ok, summary.errors) == (18, 0)


def test_a_cyclegan_config_is_refused_by_train_cut(synth, tmp_path):
    args = build_parser().parse_args(
        ["train", "cut", "--config", str(ROOT / "configs/cyclegan/quick.yaml"), "--data",
         str(synth / "manifest.csv"), "--reference-site", "site_a", "--out", str(tmp_path)])
    with pytest.raises(ConfigError, match="loss.objective: cycle"):
        command.config_from_args(args, "cut")


def test_cut_resume_continues_exactly(synth, tmp_path):
    """2 steps + --resume to 4 give the weights of 4 straight steps: the image pool and
    PatchNCE's patch draws are restored with the run."""
    import json

    from safetensors.torch import load_file

    from harmonize.translators.cyclegan import load_config, train_cyclegan

    def config(out, **extra):
        return load_config(CONFIG, {**TINY, "data.manifest": str(synth / "manifest.csv"),
                                    "data.reference_site": "site_a", "train.out": str(out),
                                    "train.steps": 4, "train.checkpoint_every": 2,
                                    "train.mixed_precision": "no", **extra})

    straight = train_cyclegan(config(tmp_path / "a"))
    train_cyclegan(config(tmp_path / "b", **{"train.steps": 2}))
    resumed = train_cyclegan(config(tmp_path / "b", **{"train.resume": True}))
    assert json.loads((resumed / "metadata.json").read_text())["steps"] == 4
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
