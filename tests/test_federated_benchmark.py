"""The shared experiment code of eval/: the federated translator benchmark (paired truth,
patient split, scores and their paired differences to central) and the bench helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harmonize.evaluation.bench_support import (
    ROOT,
    linear_fit,
    loglog_slope,
    step_seconds,
    verdict,
    write_json,
)
from harmonize.evaluation.federated_benchmark import (
    CONFIGS,
    Benchmark,
    Scores,
    fidelity_images,
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Benchmark:
    return Benchmark(tmp_path_factory.mktemp("fedbench"), per_site=8, size=32, seed=0)


def test_every_scored_image_has_its_truth(bench: Benchmark):
    assert len(bench.test) > 0
    assert len(bench.truth) == len(bench.inputs) == len(bench.test)
    for path, row, truth, x in zip(bench.truth_paths, bench.test.to_dict("records"),
                                   bench.truth, bench.inputs, strict=True):
        # the truth is the same patient as the reference site acquires it
        assert path.is_file()
        assert path.as_posix().endswith(f"synth/reference/{row['relpath']}")
        assert truth.shape == x.shape
        assert not np.allclose(truth, x)  # a source site's image differs from its truth
    # relpath as in the benchmark's own manifest (what per_image.csv keys on)
    assert all(r.startswith(f"{s}/") for r, s in zip(bench.test["relpath"], bench.test["site"],
                                                       strict=True))


def test_split_is_patient_disjoint_and_leaves_the_reference_site_out(bench: Benchmark):
    df = bench.df
    assert set(df["split"]) == {"train", "test"}
    train = set(df.loc[df["split"] == "train", "patient_id"])
    test = set(df.loc[df["split"] == "test", "patient_id"])
    assert train and test and not train & test
    assert len(df) == 4 * 8  # every image on one side
    assert bench.ref not in set(bench.test["site"])
    assert bench.ref in bench.sites and bench.ref not in bench.sources
    assert len(bench.sources) == 3
    # the reference site's held-out images are kept for the memorization yardstick
    assert bench.site_images(bench.ref, "test")
    # a reference-site image is its own truth: why the site is not scored
    ref = df[(df["site"] == bench.ref) & (df["split"] == "test")].iloc[0]
    synth = Path(bench.central_manifest).parent / "synth"
    a, b = fidelity_images([ref["path"], synth / ref["reference_path"]])
    np.testing.assert_array_equal(a, b)
    # the manifests the runs train on: training rows only, central = one node
    for path, nodes in ((bench.fed_manifest, set(bench.sites)),
                        (bench.central_manifest, {"central"})):
        saved = pd.read_csv(path)
        assert len(saved) == len(bench.train) and set(saved["split"]) == {"train"}
        assert set(saved["node"]) == nodes


def test_scores_truth_is_perfect_and_paired_difference_to_central(bench: Benchmark):
    scores = Scores(bench)
    rng = np.random.default_rng(0)
    noisy = [np.clip(t + rng.normal(0, 0.05, t.shape), 0, 1).astype(np.float32)
             for t in bench.truth]
    scores.add("identity", 0, bench.inputs, {})
    scores.add("central", 0, bench.truth, {"wall_s": 2.0})
    scores.add("noisy", 0, noisy, {"wall_s": 4.0})
    rows = {r["method"]: r for r in scores.rows}
    assert rows["central"]["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert rows["identity"]["ssim"] < rows["noisy"]["ssim"] < 0.999
    assert rows["identity"]["psnr"] < rows["noisy"]["psnr"]
    per = pd.concat(scores.per_image)
    assert len(per) == 3 * len(bench.test)
    assert set(per["relpath"]) == set(bench.test["relpath"])

    summary = scores.summary().set_index("method")
    assert summary.loc["central", "ssim"] == pytest.approx(1.0, abs=1e-5)
    assert np.isnan(summary.loc["central", "minus_central"])
    for method in ("identity", "noisy"):
        s = summary.loc[method]
        assert s["minus_central_lo"] <= s["minus_central"] <= s["minus_central_hi"] < 0
        assert s["ssim_lo"] <= s["ssim"] <= s["ssim_hi"]
        assert s["minus_central"] == pytest.approx(s["ssim"] - 1.0, abs=1e-5)
    assert summary.loc["identity", "share_of_central_gain"] == pytest.approx(0.0)
    assert 0 < summary.loc["noisy", "share_of_central_gain"] < 1
    assert summary.loc["noisy", "wall_s"] == 4.0


def test_configs_the_runs_load_exist():
    for name in ("cyclegan/quick.yaml", "diffusion/quick.yaml",
                 "federated/cyclegan-quick.yaml", "federated/diffusion-quick.yaml"):
        assert (CONFIGS / name).is_file(), name
    assert CONFIGS == ROOT / "configs"


def test_bench_support_fits_and_verdicts(tmp_path: Path):
    x = np.array([1.0, 2.0, 4.0, 8.0])
    assert loglog_slope(x, 3 * x**2) == pytest.approx(2.0)
    assert loglog_slope(x, 5 * x) == pytest.approx(1.0)
    assert linear_fit(x, 2 * x + 1) == pytest.approx((2.0, 1.0))
    assert verdict(0.5, 0.55, at_most=True) == "met (target <= 0.55)"
    assert verdict(0.6, 0.55, at_most=True) == "MISSED (target <= 0.55)"
    assert verdict(0.9, 0.8) == "met (target >= 0.8)"
    assert verdict(0.7, 0.8) == "MISSED (target >= 0.8)"
    log = pd.DataFrame({"step": [1, 2, 3, 4], "seconds": [10.0, 11.0, 12.0, 15.0]})
    assert step_seconds(log) == pytest.approx(1.0)  # median: the slow step shrugged off
    path = write_json(tmp_path / "sub" / "r.json", {"ratio": np.float32(0.5)})
    assert path.read_text().strip().startswith("{") and '"ratio": 0.5' in path.read_text()
    assert (ROOT / "eval" / "bench").is_dir()
