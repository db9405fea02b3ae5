"""A node's update is checked before it is averaged: NaN/Inf, wrong arrays, and (for the
classifier) a change far larger than the other nodes' are dropped and named; robust
strategies keep the model bounded when a large update gets through."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from harmonize.cli import main
from harmonize.federated import strategy as federation_strategy
from harmonize.federated.update_checks import UpdateCheck

CURRENT = {"w": torch.zeros(3, 2), "b": torch.zeros(2), "steps": torch.zeros((), dtype=torch.long)}


def update(scale: float = 1.0, **replace) -> dict:
    out = {"w": torch.full((3, 2), 0.1 * scale), "b": torch.full((2,), 0.1 * scale),
           "steps": torch.ones((), dtype=torch.long)}
    out.update(replace)
    return out


def test_nan_wrong_shapes_and_an_outsized_update_are_dropped_and_named():
    check = UpdateCheck(CURRENT, norm_factor=10)
    updates = [("a", update()), ("nan", update(b=torch.tensor([0.0, float("nan")]))),
               ("shape", update(w=torch.zeros(2, 3))), ("missing", {"w": torch.zeros(3, 2)}),
               ("huge", update(100)), ("c", update(1.2)), ("d", update(0.9))]
    kept, dropped = check.screen(updates)
    assert [updates[i][0] for i in kept] == ["a", "c", "d"]
    assert "NaN or Inf in 1 array(s) (e.g. b)" in dropped["nan"]
    assert "w is (2, 3) torch.float32, the model sent (3, 2) torch.float32" in dropped["shape"]
    assert "2 missing, 0 unknown" in dropped["missing"]
    assert "91x the round's median" in dropped["huge"] and "limit 10x" in dropped["huge"]


def test_two_nodes_have_no_majority_for_the_norm_check():
    kept, dropped = UpdateCheck(CURRENT, 10).screen([("a", update()), ("b", update(100))])
    assert kept == [0, 1] and not dropped


def test_the_check_compares_with_the_model_of_the_round():
    check = UpdateCheck(CURRENT, 10)
    check.advance(update(50))  # the new global model: 5.0 everywhere
    kept, dropped = check.screen([("a", update(51)), ("b", update(49)), ("c", update(50.5))])
    assert kept == [0, 1, 2], dropped


# --- in a federated run (Flower simulation, 4 nodes) --------------------------------------
@pytest.fixture(scope="module")
def synth4(tmp_path_factory):
    from harmonize.synth import generate

    out = tmp_path_factory.mktemp("fed4")
    generate(out, sites=4, per_site=8, size=32, seed=0, progress=False)
    return out


def corrupt_replies(monkeypatch, nan: str | None = None, scaled: str | None = None):
    """Nodes that send NaN or 100x weights, as the server receives them."""
    from flwr.app import ArrayRecord

    original = federation_strategy.reply_arrays

    def reply_arrays(message):
        arrays = original(message)
        name = str(message.content["node"]["name"])
        if name in (nan, scaled):
            arrays = {k: (v * (float("nan") if name == nan else 100.0))
                      if v.is_floating_point() else v for k, v in arrays.items()}
            message.content["arrays"] = ArrayRecord(arrays)
        return arrays

    monkeypatch.setattr(federation_strategy, "reply_arrays", reply_arrays)


def federate(synth4, tmp_path, name: str, **extra) -> tuple[int, pd.DataFrame, dict]:
    config = {"task": "classifier", "rounds": 2, "threads_per_node": 1, "evaluate": False,
              "classifier": {"model": {"arch": "cnn", "width": 4}, "image_size": 32,
                             "local_epochs": 1, "batch_size": 8}, **extra}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / name
    rc = main(["federated", "-q", "--config", str(tmp_path / f"{name}.yaml"), "--data",
               str(synth4 / "manifest.csv"), "--out", str(out)])
    weights = {}
    if (out / "model" / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(out / "model" / "model.safetensors")
    return rc, pd.read_csv(out / "rounds.csv"), weights


def test_a_nan_node_and_a_100x_node_are_dropped_and_the_run_finishes(synth4, tmp_path,
                                                                     monkeypatch):
    corrupt_replies(monkeypatch, nan="site_b", scaled="site_c")
    rc, rounds, weights = federate(synth4, tmp_path, "checked", min_nodes=2)
    assert rc == 0 and rounds["aggregated"].all() and (rounds["nodes_ok"] == 2).all()
    assert rounds["dropped"].str.contains("node site_b: NaN or Inf").all()
    assert rounds["dropped"].str.contains("node site_c: update norm").all()
    assert all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())


def test_fedmedian_keeps_the_model_bounded_where_fedavg_does_not(synth4, tmp_path,
                                                                  monkeypatch):
    corrupt_replies(monkeypatch, scaled="site_c")
    biggest = {}
    for strategy in ("fedavg", "fedmedian"):
        rc, rounds, weights = federate(synth4, tmp_path, strategy, strategy=strategy,
                                       update_norm_factor=None)
        assert rc == 0 and rounds["aggregated"].all()
        biggest[strategy] = max(float(v.abs().max()) for k, v in weights.items()
                                if v.is_floating_point() and "running" not in k)
    monkeypatch.undo()
    rc, _, clean = federate(synth4, tmp_path, "clean")
    clean_max = max(float(v.abs().max()) for k, v in clean.items()
                    if v.is_floating_point() and "running" not in k)
    assert biggest["fedavg"] > 10 * clean_max  # the 100x node moved the average
    assert biggest["fedmedian"] < 2 * clean_max, (biggest, clean_max)


def test_robust_strategies_are_refused_where_the_mean_is_needed():
    from harmonize.configs import ConfigError
    from harmonize.federated.config import load_federated_config

    with pytest.raises(ConfigError, match="strategy fedmedian: task cyclegan needs the mean"):
        load_federated_config(None, {"task": "cyclegan", "strategy": "fedmedian",
                                     "cyclegan.config": "configs/cyclegan/quick.yaml"})
    with pytest.raises(ConfigError, match="SecAgg"):
        load_federated_config(None, {"task": "classifier", "strategy": "krum",
                                     "privacy.secagg": True, "privacy.mode": "patient-dp",
                                     "privacy.epsilon": 10})
    assert np.isclose(load_federated_config(None, {"task": "classifier",
                                                   "strategy": "fedtrimmedavg"}).trim_beta, 0.2)
