"""`harmonize study`: the quick femur72 design end to end (four parts, one report, CSVs),
a rerun that reuses every stage, and designs refused before anything trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_checks import assert_reads_cleanly_in_a_browser

from harmonize.cli import main
from harmonize.configs import ConfigError
from harmonize.study.arms import Arm, central_arms, federated_arms, privacy_arms
from harmonize.study.config import load_study_config
from harmonize.study.run import run_study

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "configs/study/femur72_quick.yaml"
# the quick design, lighter still for the suite (the shipped config is what CI's
# 6-minute budget was set for; this keeps every part and arm)
LIGHTER = ["federated.rounds=3", "central.epochs=8", "bootstrap=200"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "run"
    sets = [arg for kv in LIGHTER for arg in ("--set", kv)]
    assert main(["study", "-q", "--config", str(QUICK), "--out", str(out), *sets]) == 0
    return out


def test_quick_study_answers_all_four_parts(quick_run):
    out = quick_run
    arms = pd.read_csv(out / "arms.csv")
    expected = {a.name for a in central_arms() + federated_arms()
                + privacy_arms([math.inf, 10.0], secagg=False, separate=False, public=True)}
    assert set(arms["arm"]) == expected
    # every arm scored on the same external node, AUC / AP / sensitivity with CIs
    assert arms["n"].nunique() == 1 and (arms["n_positive"] > 0).all()
    for metric in ("auc", "ap", "sens_at_spec"):
        assert ((arms[f"{metric}_lo"] <= arms[metric] + 1e-9)
                & (arms[metric] <= arms[f"{metric}_hi"] + 1e-9)).all()
    # federated arms report their cost; the DP arm its epsilon, within the target
    fed = arms[arms["training"] != "central"]
    assert (fed["cost_seconds_per_round"] > 0).all()
    assert (fed["cost_bytes_per_node_round"] > 0).all()
    private = arms[arms["epsilon"].astype(str) == "10.0"]
    assert len(private) == 2 and private["cost_epsilon"].between(0, 10.0).all()
    diffs = pd.read_csv(out / "differences.csv")
    # the public-reference design: landmarks fitted on the public images generated beside
    # the cohort, held to the private reference at the same target
    stage = json.loads((out / "stages/harmonize_public_epsinf/stage.json").read_text())
    assert stage["inputs"]["reference"] == str(out / "data/public/manifest.csv")
    held_to = diffs.loc[diffs["arm"] == "hm-public_fedavg_gn_eps10", "baseline"]
    assert set(held_to) == {"hm-central_central", "hm-federated_fedavg_gn_hm-eps10_eps10"}
    assert "public-reference design" in (out / "report.html").read_text()
    assert set(diffs["part"]) == {"central", "federated", "privacy"}
    assert ((diffs["lo"] <= diffs["auc_difference"] + 1e-9)
            & (diffs["auc_difference"] <= diffs["hi"] + 1e-9)).all()
    # part 1: every hospital but the reference ranked, before and after both harmonizers
    hospitals = pd.read_csv(out / "stages/part1_shift/hospitals.csv")
    assert len(hospitals) == 11 and "site_a" not in set(hospitals["site"])
    assert hospitals["distance"].is_monotonic_decreasing
    assert hospitals["after_central"].mean() < hospitals["distance"].mean()
    assert {"after_federated", "proposed_group", "node"} <= set(hospitals.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["design"]["external_node"] == "node_6"
    assert summary["design"]["patients"] < summary["design"]["images"]  # several per patient
    result = assert_reads_cleanly_in_a_browser(out / "report.html", "study_femur72_quick")
    assert result["images"] >= 6  # ranking, heat map, examples, three forest plots


def test_a_rerun_reuses_every_stage(quick_run, capsys):
    config = load_study_config(QUICK, {"out": str(quick_run), "progress": False,
                                       "federated.rounds": 3, "central.epochs": 8,
                                       "bootstrap": 200})
    before = pd.read_csv(quick_run / "arms.csv")
    run_study(config)
    summary = json.loads((quick_run / "summary.json").read_text())
    assert set(summary["reused_stages"]) == set(summary["stage_seconds"])
    assert summary["seconds"]["total"] < 60  # nothing trained again
    pd.testing.assert_frame_equal(pd.read_csv(quick_run / "arms.csv"), before)


def _refused(tmp_path, **overrides) -> str:
    config = load_study_config(QUICK, {"out": str(tmp_path / "run"), "progress": False,
                                       **overrides})
    with pytest.raises(ConfigError) as err:
        run_study(config)
    assert not list((tmp_path / "run" / "stages").glob("classifier_*")), "trained first"
    return str(err.value)


def test_designs_that_cannot_run_are_refused_before_training(tmp_path):
    assert "is in the external node" in _refused(
        tmp_path, **{"data.external_node": "node_1"})
    assert "not a node" in _refused(tmp_path, **{"data.external_node": "node_9"})
    # a DP target the budget cannot meet, named with the arm and the fix
    message = _refused(tmp_path, **{"privacy.epsilons": [0.05]})
    assert "DP-SGD epsilon 0.05" in message and "cannot be met" in message


def test_a_node_without_positives_is_refused(tmp_path):
    from harmonize.data.manifest import load_manifest, save_manifest
    from harmonize.synth import generate

    generate(tmp_path / "data", sites=4, per_site=6, size=32, seed=0, progress=False,
             prevalence=[0.5, 0.5, 0.0, 0.5], nodes=4)
    config = load_study_config(None, {"out": str(tmp_path / "run"), "progress": False,
                                      "data.manifest": str(tmp_path / "data/manifest.csv"),
                                      "data.reference_site": "site_a"})
    with pytest.raises(ConfigError, match="training node 'node_3' has no positives"):
        run_study(config)
    # a patient at two nodes
    df = load_manifest(tmp_path / "data/manifest.csv")
    df.loc[df.index[0], "patient_id"] = df["patient_id"].iloc[-1]
    save_manifest(df, tmp_path / "data/two.csv")
    config.data.manifest = tmp_path / "data/two.csv"
    with pytest.raises(ConfigError, match="appear at two nodes"):
        run_study(config)
    # the reference hospital at two nodes: the federated landmarks come from one
    df = load_manifest(tmp_path / "data/manifest.csv")
    df.loc[df.index[df["site"] == "site_a"][:2], "node"] = "node_2"
    save_manifest(df, tmp_path / "data/split_ref.csv")
    config.data.manifest = tmp_path / "data/split_ref.csv"
    with pytest.raises(ConfigError, match=r"'site_a' is at nodes \['node_1', 'node_2'\]"):
        run_study(config)


def test_arms_are_typed_values_with_stable_names():
    arm = Arm("federated", "fedavg", epsilon=3.0, harmonizer_epsilon=3.0, norm="group")
    assert arm.name == "hm-federated_fedavg_gn_hm-eps3_eps3" and arm.private
    assert "DP-SGD epsilon 3" in arm.label and "landmarks at epsilon 3" in arm.label
    assert Arm() == Arm("raw", "central") and len({*central_arms(), *federated_arms()}) == 16
    # part 2 for a second architecture: its own augmentation baseline
    from harmonize.study.arms import augmentation_baseline

    vit = [a for a in central_arms(["vit"]) if a.arch == "vit"]
    assert len(vit) == 4 and augmentation_baseline(vit[2]) == Arm("raw", augment=True,
                                                                  arch="vit")
    assert vit[2].name == "hm-central_central_vit" and "ViT" in vit[2].label
    # DP on each part alone and on both, at every finite target; one arm at inf
    arms = privacy_arms([math.inf, 10.0, 3.0], secagg=True)
    assert len(arms) == 1 + 3 + 3 + 1 and {a.epsilon for a in arms if a.private} == {10, 3}
    assert Arm("federated", "fedavg", harmonizer_epsilon=3.0, norm="group") in arms


def test_rare_class_metrics_match_sklearn_and_cover_it():
    from sklearn.metrics import average_precision_score

    from harmonize.classify.metrics import rare_class_metrics

    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.2).astype(int)
    p = rng.random(300) + 0.6 * y
    m = rare_class_metrics(y, p, n_boot=500)
    assert m["ap"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    threshold = np.quantile(p[y == 0], 0.9, method="higher")
    assert (p[y == 0] <= threshold).mean() >= 0.9
    assert m["sens_at_spec"] == pytest.approx((p[y == 1] > threshold).mean())
    assert m["ap_lo"] < m["ap"] < m["ap_hi"] and m["sens_at_spec_lo"] < m["sens_at_spec_hi"]
    # a perfect ranking: AP 1 and every positive found at 90% specificity
    perfect = rare_class_metrics(y, y + 0.01 * rng.random(300), n_boot=200)
    assert perfect["ap"] == 1.0 and perfect["sens_at_spec"] == 1.0


def test_part2_leaves_each_training_node_out(tmp_path):
    """Every training node's images scored once, by classifiers that never saw its node;
    the report and the CSVs carry it."""
    out = small_central_study(tmp_path, 1, {"central.leave_one_node_out": True})
    arms = pd.read_csv(out / "arms_leave_one_node_out.csv")
    assert len(arms) == 4 and (arms["n"] == 24).all()  # 3 training nodes x 8 patients
    diffs = pd.read_csv(out / "differences_leave_one_node_out.csv")
    assert set(diffs["baseline"]) == {"raw_central_augment"} and len(diffs) == 3
    folds = json.loads((out / "stages/left-out_hm-central_central/stage.json").read_text())
    assert folds["inputs"]["nodes"] == ["node_1", "node_2", "node_3"]
    assert "Leave one training node out" in (out / "report.html").read_text()



def test_several_seeds_give_seed_means(tmp_path):
    """seeds: every arm trained once per seed; the table gives the seed mean (per seed
    beside it), the differences pair seed with seed."""
    out = small_central_study(tmp_path, 2, {"seeds": [0, 1]})
    arms = pd.read_csv(out / "arms.csv").set_index("arm")
    assert (arms["seeds"] == 2).all()
    per_seed = arms["auc_per_seed"].str.split(" / ").map(lambda v: [float(x) for x in v])
    assert np.allclose(arms["auc"], per_seed.map(np.mean), atol=1e-3)
    assert (out / "stages/classifier_raw_central_seed1/stage.json").is_file()
    assert "seeds 0, 1" in (out / "report.html").read_text()


def test_configured_translators_join_part2_against_augmentation_and_hm(tmp_path):
    """central.translators: fitted on the training nodes' images, every hospital's images
    translated, held to augmentation and to histogram matching; both reference protocols."""
    out = small_central_study(tmp_path, 3, {"central.translators": [{"name": "fourier"}]})
    arms = pd.read_csv(out / "arms.csv").set_index("arm")
    assert {"hm-fourier_central", "hm-unseen_central"} <= set(arms.index)
    assert "fourier translations" in arms.loc["hm-fourier_central", "label"]
    diffs = pd.read_csv(out / "differences.csv")
    held_to = set(diffs.loc[diffs["arm"] == "hm-fourier_central", "baseline"])
    assert held_to == {"raw_central_augment", "hm-central_central"}
    fitted = pd.read_csv(out / "stages/harmonize_fourier_epsinf/train.csv")
    assert set(fitted["node"]) == {"node_1", "node_2", "node_3"}  # never the unseen node
    with pytest.raises(ValueError, match="taken"):
        load_study_config(None, {"data.manifest": "m.csv",
                                 "central.translators": [{"name": "central"}]})


def small_central_study(tmp_path: Path, seed: int, overrides: dict) -> Path:
    """Part 2 only, on 4 hospitals x 8 patients in 4 nodes at 32 px (seconds)."""
    from harmonize.synth import generate

    generate(tmp_path / "data", sites=4, per_site=8, size=32, seed=seed, progress=False,
             prevalence=0.5, nodes=4)
    return run_study(load_study_config(None, {
        "out": str(tmp_path / "run"), "progress": False, "parts": ["central"],
        "data.manifest": str(tmp_path / "data/manifest.csv"), "data.reference_site": "site_a",
        "data.image_size": 32, "classifier.width": 4, "central.epochs": 2,
        "bootstrap": 100, **overrides}))
