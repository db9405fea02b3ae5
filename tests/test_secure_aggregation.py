"""SecAgg+ (Flower's legacy API) for the FedAvg tasks: the secure aggregate is the plain
weighted FedAvg mean of the same node updates, within the quantization error."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from harmonize.classify.train import load_classifier
from harmonize.configs import ConfigError
from harmonize.data.manifest import load_manifest, save_manifest
from harmonize.federated.config import FederatedConfig
from harmonize.federated.nodes import node_names, node_rows, split_rows
from harmonize.federated.run import run_federated
from harmonize.federated.secagg_settings import (
    SecAggParams,
    protocol_settings,
    quantization_error_bound,
)
from harmonize.federated.secure_aggregation import (
    Layout,
    check_fits,
    decode_settings,
    encode_settings,
)
from harmonize.federated.tasks import build_task
from harmonize.synth import generate


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """3 nodes of 8, 8 and 5 images: unequal FedAvg weights."""
    out = tmp_path_factory.mktemp("secagg") / "synth"
    generate(out, sites=3, per_site=8, size=32, seed=0, progress=False,
             prevalence=[0.5, 0.5, 0.5], finding_scale=2.5)
    df = load_manifest(out / "manifest.csv")
    keep = (df["site"] != "site_c") | (df.groupby("site").cumcount() < 5)
    save_manifest(df[keep], out / "uneven.csv")
    return out / "uneven.csv"


def classifier_config(manifest, out, **extra) -> FederatedConfig:
    return FederatedConfig.model_validate({
        "task": "classifier", "rounds": 1, "threads_per_node": 1, "progress": False,
        "manifest": str(manifest), "out": str(out),
        "classifier": {"model": {"arch": "cnn", "width": 4}, "image_size": 16,
                       "local_epochs": 1, "batch_size": 8}, **extra})


def test_secure_aggregate_is_the_weighted_fedavg_mean(uneven, tmp_path):
    out = tmp_path / "run"
    cfg = classifier_config(uneven, out)
    cfg.privacy.secagg = True  # what `harmonize federated --set privacy.secagg=true` runs
    summary = run_federated(cfg)
    assert summary["failures"] == [] and summary["rounds_not_aggregated"] == []
    sa = summary["secagg"]
    assert sa["num_shares"] == 3 and sa["reconstruction_threshold"] == 2
    assert sa["quantization_range"] == 2**30 and sa["clipping_range"] == 8.0
    rounds = pd.read_csv(out / "rounds.csv")
    assert list(rounds["round"]) == [1] and bool(rounds["aggregated"].iloc[0])
    assert rounds["nodes_ok"].iloc[0] == 3 and rounds["train_loss"].notna().all()
    assert "eval_accuracy" in rounds  # each node scored the model on its test patients
    # the same round's node updates, recomputed here (seeded, one thread as the nodes)
    manifest = out / "manifest.csv"  # the run's per-node test split
    task = build_task(cfg)
    initial = task.initial_arrays()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        replies = []
        for node in node_names(manifest):
            rows, _ = split_rows(node_rows(manifest, node))
            arrays, _, metrics = task.train(initial, None, rows, {"server-round": 1})
            replies.append((arrays, float(metrics["num-examples"])))
    finally:
        torch.set_num_threads(threads)
    weights = [w for _, w in replies]
    assert len(set(weights)) > 1 and sa["max_weight"] == max(weights)
    floats = [k for k, v in initial.items() if v.is_floating_point()]
    plain = {k: sum(a[k].double() * w for a, w in replies) / sum(weights) for k in floats}
    unweighted = {k: sum(a[k].double() for a, _ in replies) / len(replies) for k in floats}
    secure = load_file(out / "shared_weights.safetensors")
    bound = quantization_error_bound(
        weights, clipping_range=sa["clipping_range"],
        quantization_range=sa["quantization_range"], max_weight=sa["max_weight"],
        max_update=max(float((a[k].double() - initial[k].double()).abs().max())
                       for a, _ in replies for k in floats),
        max_value=max(float(v.abs().max()) for v in plain.values()))
    diff = max(float((secure[k].double() - plain[k]).abs().max()) for k in floats)
    off = max(float((secure[k].double() - unweighted[k]).abs().max()) for k in floats)
    print(f"secure vs plain FedAvg: max |diff| {diff:.3g} <= bound {bound:.3g}; "
          f"vs the unweighted mean {off:.3g}")
    assert diff <= bound < 1e-6 and off > 100 * bound  # weighted by num-examples
    for k, v in initial.items():  # integer buffers are not sent: kept as initialized
        if not v.is_floating_point():
            assert torch.equal(secure[k], v)
    model, mcfg, meta = load_classifier(out / "model")  # contract checkpoint
    assert mcfg["image_size"] == 16 and meta["federated"]["secagg"]["num_shares"] == 3
    written = json.loads((out / "summary.json").read_text())
    assert written["model"] == str(out / "model") and written["nodes"] == 3
    assert set(written["secagg"]) >= {"num_shares", "reconstruction_threshold",
                                      "clipping_range", "quantization_range"}


def test_a_node_outside_the_clipping_range_is_named_and_nothing_aggregated(uneven,
                                                                             tmp_path):
    out = tmp_path / "run"
    cfg = classifier_config(uneven, out, evaluate=False, privacy={"secagg": True})
    summary = run_federated(cfg, secagg=SecAggParams(clipping_range=1e-6))
    assert summary["model"] is None and summary["rounds_not_aggregated"] == [1]
    reasons = sorted(f["reason"] for f in summary["failures"])
    assert len(reasons) == 3 and reasons[0].startswith("node site_a: its update reaches")
    assert all("clipping range" in r and len(r) <= 300 for r in reasons)
    assert not (out / "model").exists()


def test_protocol_settings_weights_and_bounds():
    assert protocol_settings(SecAggParams(), 2)["num_shares"] == 1.0  # all of 2
    s3, s4 = protocol_settings(SecAggParams(), 3), protocol_settings(SecAggParams(), 4)
    assert (s3["num_shares"], s3["reconstruction_threshold"]) == (3, 2)
    assert (s4["num_shares"], s4["reconstruction_threshold"]) == (4, 3)
    assert s3["quantization_range"] == 2**30 and s4["quantization_range"] == 2**29
    for n, q in ((1, None), (3, 2**31), (300, 2**24)):
        with pytest.raises(ConfigError):
            protocol_settings(SecAggParams(quantization_range=q), n)
    cyclegan = FederatedConfig.model_validate({"task": "cyclegan", "cyclegan": {
        "config": "configs/cyclegan/quick.yaml", "local_steps": 2}})
    assert protocol_settings(SecAggParams(), 3, cyclegan)["clipping_range"] == 256.0
    assert protocol_settings(SecAggParams(), 3, cyclegan)["max_weight"] == 1.0
    with pytest.raises(ValueError, match="node site_b: its update reaches 2"):
        check_fits({"w": torch.tensor([0.5, -2.0])}, 10, 1.0, 10, "site_b")
    assert check_fits({"w": torch.tensor([0.5, -2.0])}, 5, 1.0, 10, "site_b") == 1.0
    with pytest.raises(ValueError, match="num-examples 11 exceeds the SecAgg\\+ max_weight"):
        check_fits({"w": torch.zeros(2)}, 11, 8.0, 10, "site_b")
    # error ~ 2C/Q with max_weight = the largest weight; Flower's 1000 is ~100x worse
    tight = quantization_error_bound([10, 10, 10], clipping_range=8, quantization_range=2**30,
                                     max_weight=10, max_update=0.1)
    assert tight == pytest.approx(16 / 2**30 + 3 * 0.5 / 2**30 * 0.2 / 3, rel=1e-3)
    assert quantization_error_bound([10, 10, 10], clipping_range=8, quantization_range=2**30,
                                    max_weight=1000, max_update=0.1) > 90 * tight
    settings = {"nodes": 3, "count.sites": [4, 5], "seed": 0}
    encoded = encode_settings(settings)
    assert not any(isinstance(v, list) for v in encoded.values())
    assert decode_settings(encoded) == settings
    arrays = {"a": torch.rand(2, 3), "n": torch.tensor(7), "b": torch.zeros(4)}
    layout = Layout.of(arrays)
    assert layout.floats == ("a", "b")
    back = layout.to_dict(layout.to_list(arrays))
    assert list(back) == ["a", "n", "b"] and all(torch.equal(back[k], arrays[k]) for k in back)


def test_secagg_is_refused_where_there_is_nothing_to_sum():
    with pytest.raises(ValueError, match="node-level DP clips each node's update"):
        FederatedConfig.model_validate({"task": "classifier", "privacy": {
            "secagg": True, "dp": "server-fixed"}})
    with pytest.raises(ValueError, match="sends one node's arrays"):
        FederatedConfig.model_validate({"task": "histogram", "rounds": 1,
                                        "privacy": {"secagg": True}})
    ok = FederatedConfig.model_validate({"task": "classifier", "privacy": {
        "secagg": True, "mode": "patient-dp", "epsilon": 10}})
    assert ok.privacy.secagg and ok.privacy.mode == "patient-dp"
