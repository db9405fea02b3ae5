"""Configs that name other configs work from any working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from harmonize.configs import ConfigError
from harmonize.evaluation.config import load_eval_config
from harmonize.federated.config import load_federated_config
from harmonize.federated.cyclegan_task import CycleGANTask

ROOT = Path(__file__).resolve().parents[1]
NEEDED = {"manifest": "nodes.csv", "reference_site": "site_a"}


@pytest.mark.parametrize("name", ["cyclegan-quick", "cut-quick", "histogram-residual-quick"])
def test_a_shipped_federated_config_runs_from_another_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: `configs/...` means nothing here
    cfg = load_federated_config(ROOT / f"configs/federated/{name}.yaml", NEEDED)
    assert cfg.cyclegan.config.is_absolute() and cfg.cyclegan.config.is_file()
    kind = {"cyclegan-quick": "cyclegan", "cut-quick": "cut",
            "histogram-residual-quick": "histogram-residual"}[name]
    assert CycleGANTask.translator_config(cfg).kind == kind


def test_every_shipped_eval_config_finds_the_configs_it_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in sorted((ROOT / "configs/eval").glob("*.yaml")):
        cfg = load_eval_config(path)
        named = [t.config for t in cfg.translators if t.config is not None]
        assert all(p.is_absolute() and p.is_file() for p in named), path


def test_a_named_config_is_relative_to_the_file_that_names_it(tmp_path, monkeypatch):
    (tmp_path / "project" / "cyclegan").mkdir(parents=True)
    (tmp_path / "project" / "cyclegan" / "mine.yaml").write_text("train: {steps: 7}\n")
    fed = tmp_path / "project" / "fed.yaml"
    fed.write_text("task: cyclegan\ncyclegan:\n  config: cyclegan/mine.yaml\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_federated_config(fed, NEEDED)
    assert cfg.cyclegan.config == tmp_path / "project" / "cyclegan" / "mine.yaml"
    assert CycleGANTask.translator_config(cfg).train.steps == 7


def test_a_missing_named_config_says_where_it_looked(tmp_path):
    fed = tmp_path / "fed.yaml"
    fed.write_text("task: cyclegan\ncyclegan:\n  config: nowhere/quick.yaml\n")
    with pytest.raises(ConfigError, match=r"fed.yaml: config: nowhere/quick.yaml not found.*"
                                          r"relative to the file that names it"):
        load_federated_config(fed, NEEDED)
