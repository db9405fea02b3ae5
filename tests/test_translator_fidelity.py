"""The fidelity experiments of eval/cyclegan_fidelity.py and eval/diffusion_fidelity.py
(`harmonize.evaluation.translator_fidelity`) on a tiny synthetic benchmark: what they
score, the summaries and tables people read, and the files they write."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from harmonize.apply import apply_translator
from harmonize.data.manifest import load_manifest
from harmonize.evaluation.bench_support import ROOT
from harmonize.evaluation.fidelity import ci_cell, score_harmonized
from harmonize.evaluation.translator_fidelity import (
    benchmark,
    diffusion_fidelity,
    plot_curve,
    print_diffusion_tables,
    summarize_vs_hm,
    summarize_vs_identity,
)
from harmonize.translators import load_translator

SMALL = {"sites": 3, "per_site": 6, "size": 32, "seed": 0, "progress": False}
CSV_COLUMNS = ["relpath", "site", "label", "method", "ssim", "psnr", "image_path",
               "truth_path"]
CYCLEGAN_TINY = {"data.image_size": 32, "model.ngf": 4, "model.n_blocks": 1, "model.ndf": 8,
                 "model.n_layers_d": 2, "train.steps": 2, "train.decay_steps": 0,
                 "train.batch_size": 2, "train.log_every": 1, "train.sample_every": 100,
                 "train.checkpoint_every": 100, "inference.batch_size": 4}
DIFFUSION_TINY = {"data.image_size": 16, "model.block_out_channels": [8, 16],
                  "model.layers_per_block": 1, "model.attention": [False, False],
                  "model.norm_num_groups": 4, "train.steps": 2, "train.batch_size": 4,
                  "train.lr_warmup_steps": 0, "train.log_every": 1, "train.sample_every": 100,
                  "train.checkpoint_every": 100, "inference.steps": 5,
                  "inference.batch_size": 4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: OpenMP threads spinning on shared cores stall each other 10x
    and more (what eval/ avoids with OMP_WAIT_POLICY=PASSIVE, too late to set here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[Path, pd.DataFrame, str]:
    """Identity and histogram matching scored on the held-out non-reference images."""
    out = tmp_path_factory.mktemp("hm")
    _, test_csv, info, timings = benchmark(out, **SMALL)
    assert set(timings) == {"synth_s", "hm_fit_s"}
    ref = info["reference_site"]
    apply_translator(load_translator(out / "models" / "histogram-matching"), test_csv,
                     out / "harmonized" / "histogram-matching", progress=False)
    test = load_manifest(test_csv)
    test = test[test["site"] != ref]
    return out, score_harmonized(test, out, ["identity", "histogram-matching"]), ref


def test_histogram_matching_is_closer_to_the_truth_than_identity(scored):
    out, rows, ref = scored
    assert list(rows.columns) == CSV_COLUMNS  # fidelity.csv as the docs describe it
    n = len(rows) // 2
    assert n > 0 and (rows.groupby("method").size() == n).all()
    assert ref not in set(rows["site"])
    identity = rows[rows["method"] == "identity"]
    hm = rows[rows["method"] == "histogram-matching"]
    # identity scores the input file itself, the others their harmonized copy
    assert all(Path(p).is_file() and "harmonized" not in p for p in identity["image_path"])
    assert all(f"harmonized/histogram-matching/{r}" in p.replace("\\", "/")
               for r, p in zip(hm["relpath"], hm["image_path"], strict=True))
    assert all("/reference/" in p.replace("\\", "/") for p in rows["truth_path"])
    assert hm["ssim"].mean() > identity["ssim"].mean()
    assert hm["psnr"].mean() > identity["psnr"].mean()
    assert ((rows["ssim"] > -1) & (rows["ssim"] < 1)).all()


def test_summary_has_cis_per_site_and_paired_differences(scored):
    _, rows, ref = scored
    s = summarize_vs_identity(rows, ["identity", "histogram-matching"])
    sites = sorted(set(rows["site"]))
    assert list(s) == ["all", *sites]  # all sites first, then one entry per site
    for scope, entry in s.items():
        part = rows if scope == "all" else rows[rows["site"] == scope]
        for method in ("identity", "histogram-matching"):
            e = entry[method]
            assert e["n"] == int((part["method"] == method).sum())
            for metric in ("ssim", "psnr"):
                lo, hi = e[metric]["ci95"]
                assert lo <= e[metric]["mean"] <= hi
                assert e[metric]["mean"] == pytest.approx(
                    part.loc[part["method"] == method, metric].mean())
        assert "minus_identity" not in entry["identity"]
    d = s["all"]["histogram-matching"]["minus_identity"]["ssim"]
    assert d["mean"] > 0 and d["ci95"][0] <= d["mean"] <= d["ci95"][1]

    # the CycleGAN experiment's summary: its own method minus histogram matching, per scope
    renamed = rows.replace({"method": {"identity": "cyclegan"}})
    s = summarize_vs_hm(renamed, "cyclegan")
    assert list(s) == ["all", *sites]
    for entry in s.values():
        assert set(entry) == {"cyclegan", "histogram-matching", "minus_hm"}
        assert "minus_histogram-matching" not in entry["cyclegan"]
    assert s["all"]["minus_hm"]["ssim"]["mean"] == pytest.approx(-d["mean"])


def test_ci_cell_formats_the_table_cells():
    stats = {"mean": 0.5, "ci95": [0.25, 0.75]}
    assert ci_cell(stats, 7) == "  0.500 [  0.250,  0.750]"
    assert ci_cell(stats, 6, signed=True) == "+0.500 [+0.250,+0.750]"


def _command(name: str, monkeypatch):
    """An eval/ script's main (the thin command line over this module); the variable it
    sets on import is put back afterwards."""
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _cyclegan_args(out: Path, overrides: dict) -> list[str]:
    return ["--out", str(out), "--sites", "3", "--per-site", "6", "--size", "32",
            "--seed", "0", "--threads", "1", "--quiet",
            *(f"--set={k}={json.dumps(v)}" for k, v in overrides.items())]


@pytest.mark.filterwarnings("ignore:image .* came out inverted")  # 2 steps of training
def test_cyclegan_fidelity_writes_the_files_the_docs_describe(tmp_path: Path, capsys,
                                                              monkeypatch):
    out = tmp_path / "cg"
    assert _command("cyclegan_fidelity", monkeypatch)(_cyclegan_args(out, CYCLEGAN_TINY)) == 0
    saved = json.loads((out / "fidelity.json").read_text())
    assert set(saved) == {"kind", "seed", "cpu", "reference_site", "n_scored", "sites",
                          "size", "per_site", "timings", "cpu_threads", "summary", "seams",
                          "config"}
    assert saved["kind"] == "cyclegan" and saved["config"]["train"]["steps"] == 2
    assert saved["cpu_threads"] == 1 and saved["size"] == 32 and saved["per_site"] == 6
    assert set(saved["timings"]) == {"synth_s", "hm_fit_s", "train_s",
                                     "histogram-matching_apply_s", "cyclegan_apply_s"}
    rows = pd.read_csv(out / "fidelity.csv")
    assert list(rows.columns) == CSV_COLUMNS
    assert list(rows["method"].unique()) == ["identity", "histogram-matching", "cyclegan"]
    assert len(rows) == 3 * saved["n_scored"]
    summary = saved["summary"]
    assert list(summary) == ["all", *sorted(set(rows["site"]))]
    assert set(summary["all"]) == {"identity", "histogram-matching", "cyclegan", "minus_hm"}
    assert set(summary["all"]["minus_hm"]) == {"ssim", "psnr"}
    seams = saved["seams"]
    assert seams["image_side"] == 4 * 32 and seams["tile"] == 32
    assert {"blended", "hard", "whole_image"} <= set(seams)
    assert seams["whole_image"]["mean"] == pytest.approx(1.0, abs=0.5)  # no tiles, no seams

    table = capsys.readouterr().out
    assert "fidelity to the paired reference renderings" in table
    assert f"({saved['n_scored']} test images" in table
    assert any(line.startswith("all        minus_hm") for line in table.splitlines())
    assert "cyclegan training:" in table and "seams at 128 px (tile 32" in table


def test_federated_batch_is_checked_before_training(tmp_path: Path, monkeypatch):
    # 3 sites: 2 source nodes, which a batch of 3 cannot split over
    args = [*_cyclegan_args(tmp_path, {**CYCLEGAN_TINY, "train.batch_size": 3}),
            "--federated", str(ROOT / "configs/federated/cyclegan-quick.yaml")]
    with pytest.raises(SystemExit, match="must split evenly over the 2 source nodes"):
        _command("cyclegan_fidelity", monkeypatch)(args)
    assert not (tmp_path / "cyclegan_run").exists()


def test_diffusion_fidelity_scores_sdedit_and_ddib_and_draws_the_curves(tmp_path: Path,
                                                                          capsys):
    out = tmp_path / "dm"
    result = diffusion_fidelity(out, config=ROOT / "configs/diffusion/quick.yaml",
                                overrides=DIFFUSION_TINY, curve_images=1, **SMALL)
    saved = json.loads((out / "fidelity.json").read_text())
    assert set(saved) == {"reference_site", "n_scored", "sites", "size", "per_site",
                          "timings", "cpu_threads", "methods", "summary", "config", "curve",
                          "reconstruction"}
    methods = ["identity", "histogram-matching", "sdedit", "ddib"]
    assert saved["methods"] == methods
    assert set(saved["timings"]) == {"synth_s", "diffusion_train_s",
                                     *(f"{m}_apply_s_per_image" for m in methods[1:])}
    rows = pd.read_csv(out / "fidelity.csv")
    assert list(rows.columns) == CSV_COLUMNS
    assert list(rows["method"].unique()) == methods
    assert "minus_identity" in saved["summary"]["all"]["ddib"]

    curve = pd.read_csv(out / "curve.csv")
    assert list(curve.columns) == ["mode", "knob", "value", "steps", "t0", "ssim_truth",
                                   "psnr_truth", "ssim_input", "s_per_image"]
    assert curve.iloc[0]["mode"] == "input"
    assert curve.iloc[0]["ssim_input"] == pytest.approx(1.0)  # the input against itself
    assert len(curve) == 1 + 8 + 4 + 4 + 4
    assert (out / "curve.png").stat().st_size > 0
    assert set(saved["reconstruction"]) == {f"steps{s}_refine{r}" for s in (20, 50)
                                            for r in (0, 1)}
    assert all(np.isfinite(v) for v in saved["reconstruction"].values())

    print_diffusion_tables(result)
    table = capsys.readouterr().out
    assert "dSSIM vs identity" in table and "faithfulness (curve subset)" in table
    assert "DDIM inversion -> generation" in table


def test_plot_curve_draws_any_curve_table(tmp_path: Path):
    rows = [{"mode": "input", "knob": "-", "value": 0, "ssim_truth": 0.5, "ssim_input": 1.0}]
    for mode, knob, values in (("sdedit", "t0", (0.2, 0.4)), ("sdedit", "steps", (5, 10)),
                               ("ddib", "steps", (5, 10)), ("ddib", "t0", (0.5, 1.0))):
        rows += [{"mode": mode, "knob": knob, "value": v, "ssim_truth": 0.6,
                  "ssim_input": 0.8} for v in values]
    plot_curve(pd.DataFrame(rows), tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
