"""The synthetic multi-site benchmark: layout, reproducibility, site shift, paired truth."""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage, stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import harmonize
from harmonize.synth import SiteAcquisition, default_sites, generate, make_phantom, render
from harmonize.synth.benchmark import write_png

SYNTH_KEYS = {"modality", "size", "seed", "no_shift", "sites", "reference_site", "acquisition",
              "prevalence", "n_images", "version"}
COLUMNS = ["path", "site", "label", "patient_id", "mask", "finding_mask", "reference_path"]


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def manifest(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict, float]:
    """The documented default size: 4 sites x 50 images at 256 px, timed."""
    out = tmp_path_factory.mktemp("synth")
    start = time.perf_counter()
    summary = generate(out, sites=4, per_site=50, size=256, seed=0, progress=False)
    return out, summary, time.perf_counter() - start


@pytest.fixture(scope="module")
def no_shift(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("noshift")
    return out, generate(out, sites=4, per_site=40, size=128, seed=0, no_shift=True,
                         progress=False)


def test_default_benchmark_runs_under_a_minute(bench):
    _, summary, seconds = bench
    assert summary["n_images"] == 200
    assert seconds < 60, f"4 sites x 50 at 256 px took {seconds:.1f} s"


def test_layout_manifest_and_summary(bench):
    root, summary, _ = bench
    rows = manifest(root)
    assert list(rows[0]) == COLUMNS
    assert len(rows) == 200
    assert len({r["patient_id"] for r in rows}) == 200
    assert {r["label"] for r in rows} == {"normal", "finding"}
    for r in rows:
        assert r["path"] == f"{r['site']}/{r['label']}/{r['patient_id']}.png"
        assert r["patient_id"].startswith(r["site"] + "_")
        assert r["reference_path"] == "reference/" + r["path"]
        assert r["mask"] == "masks/" + r["path"]
        assert r["finding_mask"] == "findings/" + r["path"]
        for col in ("path", "mask", "finding_mask", "reference_path"):
            assert (root / r[col]).is_file()

    on_disk = json.loads((root / "synth.json").read_text())
    assert on_disk == summary
    assert SYNTH_KEYS <= set(summary)
    assert summary["sites"] == ["site_a", "site_b", "site_c", "site_d"]
    assert summary["reference_site"] == "site_a"
    assert summary["version"] == harmonize.__version__
    assert summary["n_images"] == 200
    for site in summary["sites"]:
        assert SiteAcquisition(**{**summary["acquisition"][site],
                                  "border": tuple(summary["acquisition"][site]["border"])})
        labels = [r["label"] == "finding" for r in rows if r["site"] == site]
        assert summary["prevalence"][site] == pytest.approx(np.mean(labels))
        assert 0.18 <= summary["prevalence"][site] <= 0.52
    assert len(set(summary["prevalence"].values())) > 1  # prevalence differs by site
    assert not any(p.name.endswith(".tmp.png") for p in root.rglob("*"))


def test_images_are_uint16_within_bit_depth_and_masks_uint8(bench):
    root, summary, _ = bench
    for r in manifest(root)[::17]:
        bits = summary["acquisition"][r["site"]]["bits"]
        image = read(root / r["path"])
        assert image.dtype == np.uint16 and image.shape == (256, 256)
        assert image.max() <= 2**bits - 1
        assert read(root / r["reference_path"]).dtype == np.uint16
        for col in ("mask", "finding_mask"):
            mask = read(root / r[col])
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}


def test_png_round_trip_is_exact(tmp_path):
    acq = default_sites(3, "xray", 0)[1]  # a 12-bit site
    phantom = make_phantom("xray", 64, True, np.random.default_rng(0))
    image = render(phantom.ideal, phantom.finding, acq, np.random.default_rng(1))
    assert image.dtype == np.uint16 and image.max() <= acq.max_value
    write_png(tmp_path / "x.png", image)
    back = read(tmp_path / "x.png")
    assert back.dtype == np.uint16 and np.array_equal(back, image)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temp file left


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    kwargs = dict(sites=2, per_site=4, size=64, progress=False)
    generate(tmp_path / "a", seed=5, **kwargs)
    generate(tmp_path / "b", seed=5, **kwargs)
    generate(tmp_path / "c", seed=6, **kwargs)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    rel = manifest(tmp_path / "a")[0]["path"]
    assert np.array_equal(read(tmp_path / "a" / rel), read(tmp_path / "b" / rel))
    other = manifest(tmp_path / "c")[0]["path"]
    assert not np.array_equal(read(tmp_path / "a" / rel), read(tmp_path / "c" / other))


def test_rerun_with_fewer_images_removes_stale_files(tmp_path):
    generate(tmp_path, sites=2, per_site=5, size=48, progress=False)
    generate(tmp_path, sites=2, per_site=2, size=48, progress=False)
    pngs = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")}
    listed = {r[c] for r in manifest(tmp_path) for c in COLUMNS if c.endswith(("path", "mask"))}
    assert pngs == listed


def site_features(root: Path, rows: list[dict[str, str]]) -> np.ndarray:
    """Simple intensity features a shortcut-learning classifier would use."""
    feats = []
    for r in rows:
        x = read(root / r["path"]).astype(np.float64) / 65535.0  # raw stored values
        pct = np.percentile(x, [1, 5, 25, 50, 75, 95, 99])
        zero = (x == 0).mean()
        top = (x == x.max()).mean()
        sharp = np.abs(np.diff(x, axis=1)).mean() / (pct[-1] - pct[0] + 1e-9)
        feats.append([*pct, zero, top, sharp])
    return np.array(feats)


def site_accuracy(root: Path) -> float:
    rows = manifest(root)
    X, y = site_features(root, rows), [r["site"] for r in rows]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(model, X, y, cv=folds).mean())


def test_sites_differ_measurably_and_no_shift_sites_do_not(bench, no_shift):
    """Criterion: 5-fold CV accuracy of a logistic regression predicting the site from
    per-image intensity features (percentiles of the raw uint16 values / 65535, fraction
    of zero pixels, fraction at the image maximum, mean neighbour difference) is > 0.9
    with site shift, and < 0.5 (chance is 0.25 for 4 sites) with ``no_shift``."""
    shifted = site_accuracy(bench[0])
    control = site_accuracy(no_shift[0])
    assert shifted > 0.9, shifted
    assert control < 0.5, control


def test_no_shift_sites_share_the_reference_model(no_shift):
    _, summary = no_shift
    models = list(summary["acquisition"].values())
    assert all(m == models[0] for m in models)
    assert summary["no_shift"] is True


def normalized(image: np.ndarray, acq: dict) -> np.ndarray:
    """Scale by the bit depth and undo inverted polarity, so styles are comparable."""
    x = image.astype(np.float64) / (2 ** acq["bits"] - 1)
    return 1.0 - x if acq["inverted"] else x


def test_reference_rendering_same_anatomy_other_style(bench):
    """Reference-site images equal their reference; other sites' images correlate with
    their reference (Spearman rho > 0.9 inside the body ROI, away from borders/markers,
    after polarity correction and light smoothing) yet differ in style (mean absolute
    difference of bit-depth-normalized images > 0.02)."""
    root, summary, _ = bench
    ref_acq = summary["acquisition"][summary["reference_site"]]
    for r in manifest(root)[::7]:
        image, ref = read(root / r["path"]), read(root / r["reference_path"])
        acq = summary["acquisition"][r["site"]]
        if r["site"] == summary["reference_site"]:
            assert np.array_equal(image, ref)
            continue
        roi = ndimage.binary_erosion(read(root / r["mask"]) > 0, iterations=3)
        valid = roi & (image > 0) & (image < 2 ** acq["bits"] - 1)
        a = ndimage.gaussian_filter(normalized(image, acq), 1.5)[valid]
        b = ndimage.gaussian_filter(normalized(ref, ref_acq), 1.5)[valid]
        assert stats.spearmanr(a, b)[0] > 0.9, r["path"]
        style = np.abs(normalized(image, acq) - normalized(ref, ref_acq))
        assert style.mean() > 0.02, r["path"]


def finding_contrast(root: Path, r: dict[str, str]) -> float:
    """Mean of the reference rendering in the finding minus a 2-5 px ring around it."""
    ref = read(root / r["reference_path"]).astype(np.float64) / 65535.0
    finding = read(root / r["finding_mask"]) > 0
    roi = read(root / r["mask"]) > 0
    ring = ndimage.binary_dilation(finding, iterations=5)
    ring &= ~ndimage.binary_dilation(finding, iterations=1) & roi
    return float(ref[finding].mean() - ref[ring].mean())


def test_findings_inside_anatomy_and_visible_in_reference(bench):
    """Positives have a non-empty finding inside the body ROI, normals none; in the
    (bone = bright) reference rendering each nodule is brighter than its surroundings by
    > 0.5% of full scale (about twice the per-pixel noise)."""
    root, _, _ = bench
    rows = manifest(root)
    for r in rows:
        finding = read(root / r["finding_mask"]) > 0
        if r["label"] == "normal":
            assert not finding.any(), r["path"]
            continue
        assert finding.any(), r["path"]
        assert (read(root / r["mask"]) > 0)[finding].all(), r["path"]
        assert finding_contrast(root, r) > 0.005, r["path"]


def test_bone_scan_modality(tmp_path):
    summary = generate(tmp_path, sites=3, per_site=8, size=128, modality="bonescan", seed=1,
                       progress=False)
    assert summary["modality"] == "bonescan"
    rows = manifest(tmp_path)
    assert len(rows) == 24
    for r in rows:
        image = read(tmp_path / r["path"])
        assert image.dtype == np.uint16 and image.shape == (128, 128)
        roi = read(tmp_path / r["mask"]) > 0
        assert 0.05 < roi.mean() < 0.5  # a tall, narrow body in a square image
        if r["label"] == "finding":
            assert finding_contrast(tmp_path, r) > 0.01, r["path"]  # hot spots


def test_site_models_are_distinct_and_validated():
    sites = default_sites(6, "xray", 0)
    assert sites[0].bits == 16 and not sites[0].inverted and sites[0].marker == "none"
    assert len({(s.bits, s.inverted, s.marker, s.resolution) for s in sites}) == 6
    assert all(s == sites[0] for s in default_sites(4, "xray", 0, no_shift=True))
    with pytest.raises(ValueError, match="bits"):
        SiteAcquisition(bits=20)


def test_bad_arguments_fail_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="modality"):
        generate(tmp_path, modality="mri", progress=False)
    with pytest.raises(ValueError, match="reference_site"):
        generate(tmp_path, sites=2, reference_site="site_z", progress=False)


def test_other_reference_site(tmp_path):
    summary = generate(tmp_path, sites=3, per_site=2, size=48, reference_site="site_b",
                       progress=False)
    assert summary["reference_site"] == "site_b"
    for r in manifest(tmp_path):
        image, ref = read(tmp_path / r["path"]), read(tmp_path / r["reference_path"])
        assert np.array_equal(image, ref) == (r["site"] == "site_b")
        assert ref.max() <= 2 ** summary["acquisition"]["site_b"]["bits"] - 1


def test_a_cohort_of_unequal_hospitals_patients_with_several_images_and_nodes(tmp_path):
    """The shape of the real cohort, small: unequal hospitals, 2-4 images per patient
    (the same anatomy and finding, acquired again), sites grouped into nodes."""
    from harmonize.synth import cohort_sizes

    sizes = cohort_sizes(12, 6, spread=0.6, seed=1)
    assert len(sizes) == 12 and min(sizes) >= 3 and max(sizes) > 1.5 * min(sizes)
    assert cohort_sizes(12, 6, spread=0.6, seed=1) == sizes  # seeded
    info = generate(tmp_path, sites=12, per_site=sizes, size=32, seed=1, progress=False,
                    prevalence=0.25, images_per_patient=(2, 4), nodes=3)
    rows = manifest(tmp_path)
    assert list(rows[0]) == [*COLUMNS, "node"]
    assert info["n_patients"] == sum(sizes) and info["n_images"] == len(rows)
    per_patient: dict[str, list[dict]] = {}
    for r in rows:
        per_patient.setdefault(r["patient_id"], []).append(r)
    assert len(per_patient) == sum(sizes)
    assert all(2 <= len(v) <= 4 for v in per_patient.values())
    assert all(len({r["site"] for r in v}) == 1 and len({r["label"] for r in v}) == 1
               for v in per_patient.values())
    # image 2 of a patient: the same finding, another acquisition
    first, second = next(v for v in per_patient.values() if v[0]["label"] == "finding")[:2]
    assert np.array_equal(read(tmp_path / first["finding_mask"]),
                          read(tmp_path / second["finding_mask"]))
    assert not np.array_equal(read(tmp_path / first["path"]), read(tmp_path / second["path"]))
    # four sites per node, in order; about a quarter of the patients positive
    assert info["nodes"] == {f"node_{n + 1}": [f"site_{c}" for c in "abcdefghijkl"[4 * n:4 * n + 4]]
                             for n in range(3)}
    positives = sum(v[0]["label"] == "finding" for v in per_patient.values())
    assert abs(positives / len(per_patient) - 0.25) < 0.08
