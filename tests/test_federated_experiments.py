"""The experiments behind eval/federated_translators.py, eval/federated_classifier.py and
eval/federated_tb_cxr.py: one tiny central-vs-federated CycleGAN comparison (Flower
simulation), run once and read by several tests; the central classifier with its outputs
(FedAvg against it: slow); the two-hospital scores on synthetic and on real images; the
pure parts (summaries, plots, memorization of prior draws) on small inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from harmonize.data.manifest import load_manifest
from harmonize.data.splits import patient_split
from harmonize.evaluation.federated_benchmark import CONFIGS, Benchmark, Federation
from harmonize.evaluation.federated_classifier_benchmark import (
    VARIANTS,
    ClassifierSettings,
    run_classifier_benchmark,
    score_rows,
    summary_text,
)
from harmonize.evaluation.federated_translator_benchmark import (
    TB_CXR_DATA,
    TbCxrSettings,
    TranslatorSettings,
    fit_site_classifier,
    grid,
    histogram,
    plot_k_sweep,
    prior_memorization,
    run_translator_benchmark,
    tb_cxr_table,
)

SUMMARY_COLUMNS = [  # as docs/results/federated_cyclegan_3seeds.csv has them
    "method", "ssim", "ssim_lo", "ssim_hi", "psnr", "ssim_per_seed", "seeds",
    "minus_central", "minus_central_lo", "minus_central_hi", "share_of_central_gain",
    "memorized_share", "rounds", "wall_s", "K", "bytes_per_node_round", "seconds_per_round",
    "reverse_memorized_share"]
TB_CXR_COLUMNS = [  # as docs/results/federated_tb_cxr.csv has them
    "method", "site_auc", "ssim_to_input", "memorized_share", "ssim_to_central",
    "ssim_to_central_lo", "ssim_to_central_hi", "identity_ssim_to_central"]


def test_settings_defaults_and_early_errors(tmp_path: Path):
    s = TranslatorSettings(task="diffusion", out=str(tmp_path))
    assert (s.seeds, s.ks, s.per_site, s.steps, s.batch, s.rounds) == (
        [0, 1, 2], [1, 5, 20], 40, 300, 2, 10)
    assert s.runs == tmp_path / "runs" and s.size == 64 and isinstance(s.out, Path)
    assert TranslatorSettings(task="cyclegan", out=tmp_path, runs=str(tmp_path / "r")).runs \
        == tmp_path / "r"
    with pytest.raises(ValueError, match="choose one of cyclegan, diffusion"):
        TranslatorSettings(task="cut", out=tmp_path)
    with pytest.raises(ValueError, match="choose 1 or k"):
        TranslatorSettings(task="cyclegan", out=tmp_path, server_lr_scale="2")

    c = ClassifierSettings(out=str(tmp_path))
    assert c.variants == ["fedavg", "fedprox", "fedbn", "fedavg-gn"] == list(VARIANTS)
    assert (c.per_site, c.rounds, c.seeds) == (100, 30, [0])
    assert c.config == CONFIGS / "federated/classifier-quick.yaml" and c.config.is_file()
    with pytest.raises(ValueError, match="choose among fedavg, fedprox, fedbn, fedavg-gn"):
        ClassifierSettings(out=tmp_path, variants=["fedavg", "fedprx"])

    tb = TbCxrSettings(out=str(tmp_path))
    # ../shared/data next to the repository, as the script's --data default always was
    assert tb.data == CONFIGS.parent.parent / "shared/data/tb_cxr_2site/manifest.csv"
    assert tb.data == TB_CXR_DATA and tb.reference_site == "shenzhen"
    assert (tb.cyclegan_steps, tb.ddib_steps, tb.size) == (300, 200, 128)


# --- the CycleGAN comparison, run once ------------------------------------------------------
@pytest.fixture(scope="module")
def cyclegan(tmp_path_factory):
    """Central vs federated CycleGAN (K = 1, Flower simulation), 2 steps of batch 1 per
    source site, one seed, on a 4-site benchmark of 8 patients per site at 64 px."""
    out = tmp_path_factory.mktemp("fed_cyclegan")
    s = TranslatorSettings(task="cyclegan", out=out, seeds=[0], ks=[1], per_site=8, steps=2,
                           batch=1)
    return s, run_translator_benchmark(s)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Benchmark:
    """The comparison's benchmark drawn again elsewhere (the same seed draws the same
    sites, patients and split)."""
    return Benchmark(tmp_path_factory.mktemp("bench"), per_site=8, size=64)


@pytest.mark.slow  # a Flower simulation beside central training: ~45 s on 2 cores
def test_cyclegan_comparison_rows_and_files(cyclegan, bench: Benchmark):
    s, summary = cyclegan
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert list(summary["method"]) == ["identity", "histogram-matching", "central",
                                       "federated K=1"]
    rows = summary.set_index("method")
    assert (rows["seeds"] == 1).all()
    assert (rows["ssim_lo"] <= rows["ssim"]).all() and (rows["ssim"] <= rows["ssim_hi"]).all()
    assert rows.loc["identity", "share_of_central_gain"] == pytest.approx(0.0)
    # matching the reference's histogram helps on the synthetic sites (paired truth)
    assert rows.loc["histogram-matching", "ssim"] > rows.loc["identity", "ssim"] + 0.1
    fed = rows.loc["federated K=1"]
    assert (fed["K"], fed["rounds"]) == (1, 2)  # rounds = steps / K
    assert fed["bytes_per_node_round"] > 1e5  # the CycleGAN's weights or update
    assert 0 <= fed["reverse_memorized_share"] <= 1 and fed["wall_s"] > 0
    assert rows.loc["central", "rounds"] == 2 and math.isnan(rows.loc["central", "K"])
    # one seed, the same images: the paired difference is the difference of the means
    assert fed["minus_central"] == pytest.approx(fed["ssim"] - rows.loc["central", "ssim"],
                                                 abs=1e-6)

    for name in ("results.csv", "per_image.csv", "summary.csv", "summary.md", "k_sweep.png"):
        assert (s.out / name).is_file(), name
    results = pd.read_csv(s.out / "results.csv")
    assert list(results["method"]) == list(summary["method"]) and set(results["seed"]) == {0}
    assert {"ssim", "psnr", "memorized_share", "bytes_per_node_round",
            "reverse_memorized_share"} <= set(results.columns)
    per = pd.read_csv(s.out / "per_image.csv")
    assert list(per.columns) == ["method", "seed", "relpath", "site", "ssim", "psnr"]
    # every method scored on every held-out image of the source sites
    for _, part in per.groupby("method"):
        assert sorted(part["relpath"]) == sorted(bench.test["relpath"])
    assert bench.ref not in set(per["site"])
    assert (s.out / "summary.md").read_text().startswith("| method | ssim |")
    for run in ("central_s0", "federated_k1_s0"):
        assert (s.runs / run / "wall.json").is_file(), run


def test_k_sweep_plot(tmp_path: Path):
    def row(method, k, ssim, bytes_=None):
        return {"method": method, "K": k, "ssim": ssim, "ssim_lo": ssim - 0.05,
                "ssim_hi": ssim + 0.05, "bytes_per_node_round": bytes_,
                "rounds": 300 / k if k else 300}

    summary = pd.DataFrame([
        row("identity", None, 0.23), row("histogram-matching", None, 0.71),
        row("central", None, 0.66), row("federated K=1", 1, 0.66, 4e6),
        row("federated K=5", 5, 0.6, 4e6), row("federated K=20", 20, 0.5, 4e6),
        row("federated K=5 lr x K", 5, 0.63, 4e6)])
    path = tmp_path / "k_sweep.png"
    plot_k_sweep(summary, path)
    assert Image.open(path).size == (935, 352)
    none = path.with_name("none.png")
    plot_k_sweep(summary[~summary["method"].str.startswith("federated")], none)
    assert not none.exists()  # no federated rows: no figure


class Prior:
    """A stand-in for a travelling DDIB prior: its draws are the given images."""

    def __init__(self, draws: dict[str, list[np.ndarray]]) -> None:
        self.draws = draws

    def sample_prior(self, n: int, site: str) -> torch.Tensor:
        return torch.from_numpy(np.stack(self.draws[site][:n]))[:, None]


def test_prior_memorization_flags_copies_of_training_images(bench: Benchmark):
    copies = {site: bench.site_images(site, "train") for site in bench.sites}
    assert prior_memorization(bench, Prior(copies), bench.sites) == 1.0
    rng = np.random.default_rng(0)
    noise = {site: [rng.uniform(0, 1, x.shape).astype(np.float32) for x in xs]
             for site, xs in copies.items()}
    assert prior_memorization(bench, Prior(noise), [bench.ref]) == 0.0
    mixed = {bench.ref: copies[bench.ref], bench.sources[0]: noise[bench.sources[0]]}
    assert prior_memorization(bench, Prior(mixed), [bench.ref, bench.sources[0]]) == 0.5


# --- the real-hospital scores, on the synthetic benchmark and on the real data --------------
def test_tb_cxr_table_scores_against_central_and_the_reference_style(bench: Benchmark,
                                                                   tmp_path: Path):
    rng = np.random.default_rng(0)
    noisy = [np.clip(t + rng.normal(0, 0.05, t.shape), 0, 1).astype(np.float32)
             for t in bench.truth]
    outputs = {"identity": bench.inputs, "cyclegan central": bench.truth,
               "cyclegan federated K=1": bench.truth, "ddib central": bench.truth,
               "ddib federated local priors": noisy}
    table = tb_cxr_table(bench, outputs)
    assert list(table.columns) == TB_CXR_COLUMNS
    rows = table.set_index("method")
    assert rows.loc["identity", "ssim_to_input"] == pytest.approx(1.0, abs=1e-5)
    assert rows.loc["identity", TB_CXR_COLUMNS[4:]].isna().all()
    # the federated output equal to central's agrees perfectly, a noisy one less
    assert rows.loc["cyclegan federated K=1", "ssim_to_central"] == pytest.approx(1.0)
    fed = rows.loc["ddib federated local priors"]
    assert fed["ssim_to_central_lo"] <= fed["ssim_to_central"] <= fed["ssim_to_central_hi"] < 1
    assert fed["identity_ssim_to_central"] == pytest.approx(
        rows.loc["cyclegan federated K=1", "identity_ssim_to_central"])
    assert fed["identity_ssim_to_central"] < 0.9  # the sources' style differs from truth
    # the truth carries the reference's style: the site classifier sees less of the source
    assert rows.loc["identity", "site_auc"] > rows.loc["cyclegan central", "site_auc"]

    grid(tmp_path / "grid.png", bench, outputs)
    image = Image.open(tmp_path / "grid.png")
    assert image.size == (int(1.9 * 80 * 5), int(1.9 * 80 * 4))  # 5 methods x 4 patients


def test_real_hospitals_told_apart_and_copies_flagged(tb_cxr, tmp_path: Path):
    """20 patients per hospital: the site classifier tells raw Montgomery from Shenzhen;
    "outputs" that are Shenzhen's own training images look less like Montgomery and are
    all flagged as memorized."""
    df = load_manifest(tb_cxr / "manifest.csv")
    df = pd.concat([g[g["patient_id"].isin(g["patient_id"].unique()[:20])]
                    for _, g in df.groupby("site")])
    h = Federation(tmp_path, patient_split(df, test_size=0.25, seed=0), "shenzhen")
    assert h.sources == ["montgomery"] and set(h.test["site"]) == {"montgomery"}
    copies = h.site_images(h.ref, "train")[: len(h.inputs)]
    assert len(copies) == len(h.inputs)
    table = tb_cxr_table(h, {"identity": h.inputs, "ddib central": copies}).set_index(
        "method")
    assert table.loc["identity", "site_auc"] >= 0.9
    assert table.loc["identity", "memorized_share"] == 0.0
    assert table.loc["ddib central", "site_auc"] < table.loc["identity", "site_auc"]
    assert table.loc["ddib central", "memorized_share"] == 1.0
    assert table.loc["ddib central", "ssim_to_central"] == pytest.approx(1.0)
    clf = fit_site_classifier({"a": [np.zeros((8, 8))] * 3, "b": [np.ones((8, 8))] * 3}, "b")
    assert clf.predict([histogram(np.ones((4, 4))), histogram(np.zeros((4, 4)))]).tolist() \
        == [1, 0]


# --- the classifier comparison --------------------------------------------------------------
def tiny_classifier_config(folder: Path) -> Path:
    """classifier-quick.yaml at 32 px and 1 local epoch."""
    cfg = yaml.safe_load((CONFIGS / "federated/classifier-quick.yaml").read_text())
    cfg["classifier"].update(image_size=32, local_epochs=1)
    path = folder / "classifier.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


CLASSIFIER_COLUMNS = ["seed", "method", "auc", "auc_lo", "auc_hi", "auc_per_site", "accuracy",
                      "auc_minus_central", "diff_lo", "diff_hi", "p_value", "wall_s"]


def test_central_classifier_rows_and_files(tmp_path: Path):
    """Without federated variants (no Flower start-up): the central CNN, with and without
    each site's own BatchNorm statistics, on 4 sites x 16 patients, 1 round."""
    s = ClassifierSettings(out=tmp_path, config=tiny_classifier_config(tmp_path),
                           per_site=16, rounds=1, variants=[], seeds=[0])
    table, text = run_classifier_benchmark(s)
    assert list(table.columns) == CLASSIFIER_COLUMNS
    assert list(table["method"]) == ["central", "central + site BN"]
    rows = table.set_index("method")
    assert rows.loc["central", "auc_minus_central"] == 0.0
    for method in rows.index:
        r = rows.loc[method]
        assert 0 <= r["auc_lo"] <= r["auc"] <= r["auc_hi"] <= 1
        assert 0 <= r["accuracy"] <= 1
    # a "+ site BN" row reports the training time of its model
    assert rows.loc["central + site BN", "wall_s"] == rows.loc["central", "wall_s"] > 0

    saved = pd.read_csv(tmp_path / "results.csv")
    assert list(saved.columns) == CLASSIFIER_COLUMNS and len(saved) == 2
    assert (tmp_path / "results.md").read_text() == text
    assert text.startswith("4 nodes, 1 rounds; seeds 0\n\nper seed:\n\n| seed | method |")
    assert "\nmean over seeds:\n\n| method | auc | auc_per_site |" in text
    split = load_manifest(tmp_path / "seed_0" / "manifest.csv")
    assert len(split) == 4 * 16 and set(split["split"]) == {"train", "test"}
    assert split.groupby("node")["split"].apply(lambda x: (x == "test").mean()).between(
        0.1, 0.4).all()  # 25% held out at every node


@pytest.mark.slow
def test_fedavg_classifier_against_central(tmp_path: Path):
    s = ClassifierSettings(out=tmp_path, config=tiny_classifier_config(tmp_path),
                           per_site=16, rounds=1, variants=["fedavg", "fedavg-gn"], seeds=[0])
    table, _ = run_classifier_benchmark(s)
    assert list(table["method"]) == ["central", "central + site BN", "central-gn", "fedavg",
                                     "fedavg + site BN", "fedavg-gn"]
    rows = table.set_index("method")
    assert rows.loc["central-gn", "auc_minus_central"] == 0.0  # its own reference
    assert rows.loc["fedavg + site BN", "wall_s"] == rows.loc["fedavg", "wall_s"] > 0
    for name in ("fedavg", "fedavg-gn"):
        assert (tmp_path / "seed_0" / "runs" / name / "summary.json").is_file()


def test_score_rows_compare_each_model_with_its_central():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    sites = np.repeat(["a", "b"], 20)
    good = np.clip(y * 0.6 + rng.uniform(0, 0.4, 40), 0, 1)
    probs = {"central": good, "fedavg": rng.uniform(0, 1, 40), "central-gn": good,
             "fedavg-gn": good, "fedavg + site BN": good}
    rows = pd.DataFrame(score_rows(y, sites, probs, {"central": 1.0, "fedavg": 5.0}, seed=3))
    rows = rows.set_index("method")
    assert (rows["seed"] == 3).all()
    assert rows.loc["central", "auc"] == 1.0 and rows.loc["central", "auc_per_site"] == 1.0
    assert rows.loc["fedavg", "auc_minus_central"] < -0.2
    assert rows.loc["fedavg-gn", "auc_minus_central"] == 0.0  # against central-gn
    assert rows.loc["fedavg + site BN", "wall_s"] == 5.0
    assert rows.loc["central-gn", "wall_s"] is None or np.isnan(rows.loc["central-gn",
                                                                          "wall_s"])


def test_summary_text_means_over_seeds():
    table = pd.DataFrame({"seed": [0, 0, 1, 1], "method": ["central", "fedbn"] * 2,
                          "auc": [0.8, 0.7, 0.9, 0.6], "auc_per_site": 0.5,
                          "accuracy": 0.7, "auc_minus_central": [0, -0.1, 0, -0.3],
                          "wall_s": [1.0, 2.0, 3.0, 4.0], "p_value": 0.5})
    text = summary_text(table, rounds=30, seeds=[0, 1])
    head, mean = text.split("\nmean over seeds:\n\n")
    assert head.startswith("4 nodes, 30 rounds; seeds 0,1\n\nper seed:\n\n")
    assert len(head.strip().splitlines()) == 4 + 2 + len(table)
    lines = mean.strip().splitlines()
    assert lines[0].startswith("| method | auc | auc_per_site | accuracy | auc_minus_central |")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["central", "fedbn"]
    assert "0.85" in lines[2] and "-0.2" in lines[3]

