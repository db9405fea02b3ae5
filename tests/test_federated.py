"""Federated training with Flower: simulation runs, privacy accounting, node failures,
memorization check."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from harmonize.classify.train import load_classifier
from harmonize.cli import main
from harmonize.federated.privacy import gaussian_epsilon, noise_for_epsilon
from harmonize.memorization import memorization_report, nearest_training


def write_config(path, **extra) -> str:
    config = {"task": "classifier", "rounds": 2, "threads_per_node": 1,
              "classifier": {"model": {"arch": "cnn", "width": 4}, "image_size": 32,
                             "local_epochs": 1, "batch_size": 8}, **extra}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run_translator_federated(config, synth3, out):
    """`harmonize federated` of a translator config over synth3's 3 nodes (ref site_a)."""
    assert main(["federated", "-q", "--config", str(config), "--data",
                 str(synth3 / "manifest.csv"), "--reference-site", "site_a", "--out",
                 str(out)]) == 0
    return out


def assert_apply_harmonizes_site_b(model, synth3, harmonized):
    assert main(["apply", "-q", "--model", str(model), str(synth3 / "site_b"),
                 str(harmonized)]) == 0
    assert len(list(harmonized.rglob("*.png"))) == 16


def test_epsilon_matches_opacus_and_flower_accountants():
    # opacus RDPAccountant (q=1) and Flower's dp-accounting give 30.1266 and 7.0774
    assert gaussian_epsilon(1.0, 20, 1e-5) == pytest.approx(30.1266, abs=1e-3)
    assert gaussian_epsilon(1.0, 2, 1e-5) == pytest.approx(7.0774, abs=1e-3)
    assert gaussian_epsilon(2.0, 10, 1e-5) < gaussian_epsilon(1.0, 10, 1e-5)
    assert gaussian_epsilon(0.0, 10, 1e-5) == float("inf")
    z = noise_for_epsilon(8.0, 10, 1e-5)
    assert gaussian_epsilon(z, 10, 1e-5) == pytest.approx(8.0, rel=1e-3)


def test_federated_classifier_with_fedprox_fedbn_and_dp(synth3, tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", strategy="fedprox", proximal_mu=0.01,
                          privacy={"dp": "server-fixed", "noise_multiplier": 0.5,
                                   "clipping_norm": 5.0},
                          parallel_nodes=2)  # two Ray actors train nodes at once
    with open(config) as fh:
        raw = yaml.safe_load(fh)
    raw["classifier"]["local_bn"] = True
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["federated", "-q", "--config", config, "--data",
                 str(synth3 / "manifest.csv"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 rounds over 3 nodes (site_a, site_b, site_c)" in printed and "epsilon" in printed
    rounds = pd.read_csv(out / "rounds.csv")
    assert list(rounds["round"]) == [1, 2] and (rounds["nodes_ok"] == 3).all()
    assert rounds["train_loss"].notna().all() and rounds["eval_auc"].between(0, 1).all()
    assert rounds["train_update_norm"].gt(0).all()
    # round times: the round's replies arrive after the nodes' own training time
    assert rounds["seconds"].is_monotonic_increasing and rounds["seconds"].gt(0).all()
    assert rounds["train_compute_seconds"].gt(0).all()
    assert (rounds["seconds"].iloc[0] > rounds["train_compute_seconds"].iloc[0])
    eps = [gaussian_epsilon(0.5, r, 1e-5) for r in (1, 2)]
    np.testing.assert_allclose(rounds["epsilon"], eps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failures"] == [] and summary["epsilon"] == pytest.approx(eps[1])
    model, cfg, meta = load_classifier(out / "model")  # contract checkpoint
    assert cfg["image_size"] == 32 and meta["federated"]["nodes"] == 3
    assert (out / "rounds.png").is_file()
    # every node evaluated on its own held-out patients (split added per node)
    split = pd.read_csv(out / "manifest.csv")
    assert set(split.groupby("node")["split"].apply(lambda s: (s == "test").any())) == {True}


def test_fedper_keeps_each_nodes_head_and_shares_the_body(synth3):
    """FedPer: the head a node trained is the one it starts the next round with; the body
    comes from the server; the server's average head is what an unseen hospital gets."""
    from harmonize.federated.classifier_task import ClassifierTask
    from harmonize.federated.config import load_federated_config

    config = load_federated_config(None, {
        "task": "classifier", "classifier.model.arch": "cnn", "classifier.model.width": 4,
        "classifier.image_size": 32, "classifier.batch_size": 8,
        "classifier.local_head": True})
    task = ClassifierTask(config)
    rows = pd.read_csv(synth3 / "manifest.csv")
    rows = rows[rows["site"] == "site_b"].assign(
        path=lambda d: [str(synth3 / p) for p in d["path"]], node="site_b")
    start = task.initial_arrays()
    trained, own, _ = task.train(start, None, rows, {"server-round": 1})
    assert sorted(own) == ["net.head.bias", "net.head.weight"]
    assert not torch.equal(own["net.head.weight"], start["net.head.weight"])
    shared = {k: v + 0.01 for k, v in start.items()}  # the next round's global model
    model = task._model(shared, own)
    state = model.state_dict()
    assert torch.equal(state["net.head.weight"], own["net.head.weight"])  # its own head
    assert torch.equal(state["net.features.0.weight"], shared["net.features.0.weight"])
    assert "net.head.weight" in trained  # still sent: the average serves unseen hospitals


def test_a_broken_node_is_named_by_the_server(synth3, tmp_path, capsys):
    df = pd.read_csv(synth3 / "manifest.csv")
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in df.loc[df["site"] == "site_b", "path"]:  # unreadable images at one node
        (broken / p).parent.mkdir(parents=True, exist_ok=True)
        (broken / p).write_bytes(b"not an image")
    df["path"] = [str(broken / p) if s == "site_b" else str(synth3 / p)
                  for p, s in zip(df["path"], df["site"], strict=True)]
    df.drop(columns=["mask", "finding_mask", "reference_path"]).to_csv(
        tmp_path / "m.csv", index=False)
    out = tmp_path / "run"
    assert main(["federated", "-q", "--config", write_config(tmp_path / "c.yaml"),
                 "--data", str(tmp_path / "m.csv"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "node site_b" in err and "round 1" in err
    # fewer replies than nodes: no round changed the model, none was written
    assert "2 of 2 rounds had fewer than 3 replies" in err and "no model written" in err
    rounds = pd.read_csv(out / "rounds.csv")
    assert (rounds["nodes_ok"] == 2).all() and not rounds["aggregated"].any()
    assert rounds["failed"].str.contains("node site_b").all()
    assert (rounds["failed"].str.len() <= 300).all()  # one line per failure, not a traceback
    assert not (out / "model").exists()


def test_memorization_flags_copies_not_new_patients(synth3):
    from harmonize.data.intensity import IntensityPolicy
    from harmonize.data.io import read_image

    df = pd.read_csv(synth3 / "manifest.csv")
    policy = IntensityPolicy()
    ref = [policy.to_model(read_image(synth3 / p))[0]
           for p in df.loc[df["site"] == "site_a", "path"]]
    train, new = ref[:10], ref[10:]
    d, idx = nearest_training([train[3], 0.5 * train[3] + 0.2], train)
    assert d.max() < 1e-5 and list(idx) == [3, 3]  # copies, even with other brightness
    copies = memorization_report([train[0], train[5]], train, new)
    assert copies["flagged"] == 2
    honest = memorization_report(new[:3], train, new[3:])  # new patients are not copies
    assert honest["flagged"] == 0


def test_federated_cyclegan_gives_a_translator_harmonize_apply_can_use(synth3, tmp_path):
    from pathlib import Path

    config = tmp_path / "cg.yaml"
    config.write_text(yaml.safe_dump({
        "task": "cyclegan", "rounds": 2, "evaluate": False, "threads_per_node": 1,
        "cyclegan": {"config": str(Path(__file__).parents[1] / "configs/cyclegan/quick.yaml"),
                     "set": {"data.image_size": 32, "model.ngf": 8, "model.n_blocks": 1,
                             "model.ndf": 8, "train.batch_size": 2},
                     "local_steps": 2}}))
    out = run_translator_federated(config, synth3, tmp_path / "run")
    rounds = pd.read_csv(out / "rounds.csv")
    assert (rounds["nodes_ok"] == 3).all() and rounds["train_loss_g"].notna().all()
    assert (rounds["train_bytes_sent"] > 0).all()  # all four networks, every round
    meta = json.loads((out / "model" / "metadata.json").read_text())
    assert meta["kind"] == "cyclegan" and meta["reference_site"] == "site_a"
    assert_apply_harmonizes_site_b(out / "model", synth3, tmp_path / "harmonized")
    with pytest.raises(Exception, match="cyclegan.config"):
        from harmonize.federated.config import load_federated_config

        config.write_text(yaml.safe_dump({"task": "cyclegan"}))
        load_federated_config(config)


def test_a_node_without_rows_or_with_an_unreadable_manifest_says_so(synth3, tmp_path):
    from harmonize.federated.nodes import node_rows, resolve_node

    with pytest.raises(ValueError, match="node 'hospital_x': no rows for this node in .*"
                                         "manifest.csv"):
        node_rows(synth3 / "manifest.csv", "hospital_x")
    (tmp_path / "bad.csv").write_text("not,a\nmanifest")
    with pytest.raises(ValueError, match="node 'site_a': cannot read its manifest .*bad.csv"):
        node_rows(tmp_path / "bad.csv", "site_a")
    # deployments name the node and its own manifest in --node-config
    name, path = resolve_node({"node": "site_b", "manifest": "/data/b.csv"}, None)
    assert (name, str(path)) == ("site_b", "/data/b.csv")
    assert resolve_node({"partition-id": 2}, synth3 / "manifest.csv")[0] == "site_c"
    with pytest.raises(ValueError, match="partition 5"):
        resolve_node({"partition-id": 5}, synth3 / "manifest.csv")


def test_nodes_read_the_manifest_once_until_it_changes(synth3, tmp_path):
    from harmonize.data.manifest import load_manifest, save_manifest
    from harmonize.federated.nodes import node_rows, read_manifest

    path = tmp_path / "m.csv"
    save_manifest(load_manifest(synth3 / "manifest.csv"), path)
    assert read_manifest(path) is read_manifest(path)  # every round's messages: no re-read
    full = len(node_rows(path, "site_b"))
    df = load_manifest(path)
    save_manifest(df[~((df["node"] == "site_b") & (df.index % 2 == 0))], path)
    assert 0 < len(node_rows(path, "site_b")) < full  # a changed file is read again


def test_federated_ddib_prior_trains_each_site_label_and_applies(synth3, tmp_path):
    from pathlib import Path

    from harmonize.translators import load_translator

    config = tmp_path / "dd.yaml"
    config.write_text(yaml.safe_dump({
        "task": "diffusion", "rounds": 2, "threads_per_node": 1,
        "diffusion": {"config": str(Path(__file__).parents[1] / "configs/diffusion/quick.yaml"),
                      "set": {"data.image_size": 32, "model.block_out_channels": [8, 16],
                              "model.attention": [False, False], "model.norm_num_groups": 4,
                              "train.batch_size": 2, "inference.steps": 5},
                      "local_steps": 2}}))
    out = run_translator_federated(config, synth3, tmp_path / "run")
    rounds = pd.read_csv(out / "rounds.csv")
    # every node trains and scores the global prior on its own held-out patients
    assert (rounds["nodes_ok"] == 3).all() and rounds["eval_loss"].between(0, 10).all()
    translator = load_translator(out / "model")
    assert translator.mode == "ddib" and translator.class_sites == ["site_a", "site_b", "site_c"]
    # each site's class row was trained (scaled change: not diluted 1/3 by the average)
    from harmonize.federated.config import load_federated_config
    from harmonize.federated.tasks import build_task

    cfg = load_federated_config(config, {"reference_site": "site_a", "seed": 0,
                                         "diffusion.sites": ["site_a", "site_b", "site_c"]})
    initial = build_task(cfg).initial_arrays()["class_embedding.weight"]
    trained = translator.unets_["*"].state_dict()["class_embedding.weight"]
    assert ((trained - initial).abs().sum(dim=1)[:3] > 0).all()
    assert_apply_harmonizes_site_b(out / "model", synth3, tmp_path / "harmonized")
    with pytest.raises(Exception, match="diffusion.sites"):
        build_task(load_federated_config(config, {"reference_site": "site_a"}))


def test_federated_ddib_with_local_priors_sends_only_the_reference_prior(synth3, tmp_path):
    from pathlib import Path

    from harmonize.translators import load_translator

    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump({
        "task": "diffusion", "rounds": 1, "threads_per_node": 1,
        "diffusion": {"prior": "local",
                      "config": str(Path(__file__).parents[1] / "configs/diffusion/quick.yaml"),
                      "set": {"data.image_size": 32, "model.block_out_channels": [8, 16],
                              "model.attention": [False, False], "model.norm_num_groups": 4,
                              "train.batch_size": 2, "inference.steps": 5},
                      "local_steps": 3}}))
    out = run_translator_federated(config, synth3, tmp_path / "run")
    summary = json.loads((out / "summary.json").read_text())
    rounds = pd.read_csv(out / "rounds.csv")
    # only the reference node sent weights: one prior's bytes
    server = load_translator(out / "model")
    assert server.model_sites == ["site_a"] and not server.conditioned
    prior_bytes = sum(v.numel() * 4 for v in server.unets_["site_a"].state_dict().values())
    assert rounds["train_bytes_sent"].iloc[0] == pytest.approx(prior_bytes)
    # each node keeps its translator: its own prior + the reference prior it received
    assert sorted(summary["node_models"]) == ["site_a", "site_b", "site_c"]
    node_b = load_translator(summary["node_models"]["site_b"])
    assert node_b.mode == "ddib" and sorted(node_b.model_sites) == ["site_a", "site_b"]
    for k, v in server.unets_["site_a"].state_dict().items():
        assert torch.equal(node_b.unets_["site_a"].state_dict()[k], v)
    own = load_translator(out / "nodes" / "site_b" / "prior_site_b" / "run" / "model")
    for k, v in own.unets_["site_b"].state_dict().items():  # the node's own, never sent
        assert torch.equal(node_b.unets_["site_b"].state_dict()[k], v)
    assert rounds["eval_loss"].between(0, 10).all()
    assert_apply_harmonizes_site_b(summary["node_models"]["site_b"], synth3,
                                   tmp_path / "harmonized")
    # a rerun into the same folder trains afresh and says so; its node models are new
    before = (out / "nodes" / "site_b" / "model" / "metadata.json").stat().st_mtime
    run_translator_federated(config, synth3, out)
    assert (out / "nodes" / "site_b" / "model" / "metadata.json").stat().st_mtime > before
    with pytest.raises(Exception, match="rounds: 1"):
        from harmonize.federated.config import load_federated_config

        load_federated_config(config, {"rounds": 3})


def test_optimizer_state_survives_the_round_trip_through_arrays():
    import torch

    from harmonize.classify.networks import Classifier
    from harmonize.federated.node_state import load_optimizer_state, optimizer_arrays

    model = Classifier("cnn", 32, width=4, norm="group")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(2, 1, 32, 32)).sum().backward()
    opt.step()
    arrays = optimizer_arrays(opt)
    assert arrays and all(k.startswith("opt.") for k in arrays)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    load_optimizer_state(fresh, arrays)
    for k, state in fresh.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), arrays[f"opt.{k}.{name}"])


def test_a_round_with_too_few_replies_leaves_the_model_unchanged():
    from types import SimpleNamespace

    from harmonize.federated.strategy import FederationStrategy

    calls = []
    inner = SimpleNamespace(aggregate_train=lambda r, replies: calls.append(len(replies))
                            or ("arrays", {"loss": 1.0}))
    log: dict = {}
    strategy = FederationStrategy(inner, log, required=3)

    def reply(name=None, error=None):
        return SimpleNamespace(has_error=lambda: error is not None,
                               error=SimpleNamespace(reason=error),
                               content={"node": {"name": name}} if name else {})

    killed = "ray actor died\n" + "traceback line\n" * 300
    assert strategy.aggregate_train(7, [reply("a"), reply(error=killed)]) == (None, None)
    assert calls == [] and not log[7]["aggregated"]
    assert len(log[7]["failed"][0]) <= 300 and "\n" not in log[7]["failed"][0]
    assert strategy.aggregate_train(8, [reply("c"), reply("a"), reply("b")]) == (
        "arrays", {"loss": 1.0})
    assert calls == [3] and log[8]["aggregated"] and log[8]["ok"] == ["a", "b", "c"]
    assert log[8]["train_metrics"] == {"loss": 1.0}


def test_node_sampling_trains_k_nodes_a_round_and_amplifies_node_dp(synth3, tmp_path):
    from harmonize.configs import ConfigError
    from harmonize.federated.config import load_federated_config
    from harmonize.federated.server_app import _epsilon

    out = tmp_path / "run"
    assert main(["federated", "-q", "--config", write_config(tmp_path / "c.yaml",
                                                             sample_nodes=2, evaluate=False),
                 "--data", str(synth3 / "manifest.csv"), "--out", str(out)]) == 0
    rounds = pd.read_csv(out / "rounds.csv")
    assert (rounds["nodes_ok"] == 2).all() and rounds["aggregated"].all()
    cfg = load_federated_config(None, {"task": "classifier", "privacy.mode": "node-dp",
                                       "privacy.dp": "server-fixed", "sample_nodes": 0.5})
    assert cfg.sampled(6) == 3 and cfg.sampled(3) == 2
    every, half = _epsilon(cfg, 20, 1.0), _epsilon(cfg, 20, 0.5)
    assert np.isclose(every, 30.13, atol=0.05) and np.isclose(half, 16.55, atol=0.05)
    with pytest.raises(ConfigError, match="sample_nodes: task cyclegan needs every node"):
        load_federated_config(None, {"task": "cyclegan", "sample_nodes": 2,
                                     "cyclegan.config": "configs/cyclegan/quick.yaml"})
