"""Manifest loading, validation, folder discovery, saving, binary labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harmonize.data.manifest import (
    ManifestError,
    binary_targets,
    load_manifest,
    manifest_from_folder,
    positive_label,
    safe_relpath,
    save_manifest,
)


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A 4-image tree with a valid manifest; tests break it in one place each."""
    for rel in ("a/normal/p1.png", "a/tb/p2.png", "b/normal/p3.png", "b/tb/p4.png"):
        _touch(tmp_path / rel)
    return tmp_path


def _write(folder: Path, text: str, name: str = "manifest.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


GOOD = (
    "path,site,label,patient_id\n"
    "a/normal/p1.png,a,normal,p1\n"
    "a/tb/p2.png,a,tb,p2\n"
    "b/normal/p3.png,b,normal,p3\n"
    "b/tb/p4.png,b,tb,p4\n"
)


# --- real data ------------------------------------------------------------------------


def test_load_real_manifest_with_mask_column(tb_cxr: Path):
    df = load_manifest(tb_cxr / "manifest.csv", mask_column="lung_mask")
    assert len(df) == 800
    assert sorted(df["site"].unique()) == ["montgomery", "shenzhen"]
    assert df["site"].value_counts().to_dict() == {"shenzhen": 662, "montgomery": 138}
    assert list(df.columns[:7]) == [
        "path", "site", "label", "patient_id", "node", "mask", "relpath"
    ]
    assert "lung_mask" not in df.columns  # renamed to mask
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    masks = df["mask"][df["mask"] != ""]
    assert len(masks) == 704 and all(Path(m).is_file() for m in masks)
    assert not df.isna().any().any()
    assert (df["node"] == df["site"]).all()
    raw = pd.read_csv(tb_cxr / "manifest.csv", dtype=str)
    assert df["relpath"].tolist() == raw["path"].tolist()


def test_real_manifest_without_mask_column_keeps_extra_column(tb_cxr: Path):
    df = load_manifest(tb_cxr / "manifest.csv")
    assert "mask" not in df.columns and "lung_mask" in df.columns
    assert df["lung_mask"].iloc[0].startswith("masks/")  # an extra column is left as is


def test_folder_discovery_reproduces_real_manifest(tb_cxr: Path):
    listed = load_manifest(tb_cxr / "manifest.csv", mask_column="lung_mask")
    found = manifest_from_folder(tb_cxr)
    assert len(found) == 800
    assert set(found["path"]) == set(listed["path"])
    by_path = listed.set_index("path")
    found = found.set_index("path")
    assert (found["site"] == by_path.loc[found.index, "site"]).all()
    assert (found["label"] == by_path.loc[found.index, "label"]).all()
    assert (found["mask"] == by_path.loc[found.index, "mask"]).all()  # masks/ mirror found
    assert not found["site"].eq("masks").any()
    assert found.index.tolist() == sorted(found.index)  # deterministic order


# --- validation -----------------------------------------------------------------------


def test_valid_small_manifest(small: Path):
    df = load_manifest(_write(small, GOOD))
    assert df["path"].tolist() == [str(small / r) for r in df["relpath"]]
    assert df["label"].tolist() == ["normal", "tb", "normal", "tb"]
    assert df["node"].tolist() == ["a", "a", "b", "b"]


def test_missing_file_names_row_and_folder(small: Path):
    text = GOOD.replace("b/tb/p4.png", "b/tb/missing.png")
    with pytest.raises(ManifestError) as err:
        load_manifest(_write(small, text))
    msg = str(err.value)
    assert "manifest.csv row 4 (spreadsheet row 5):" in msg
    assert "'b/tb/missing.png' not found" in msg
    assert f"relative to {small.resolve()}" in msg
    assert "\n" not in msg  # one problem, one line
    assert err.value.problems[0][0] == 4


def test_empty_site_and_patient_reported_together(small: Path):
    text = GOOD.replace("a/tb/p2.png,a,tb,p2", "a/tb/p2.png,,tb,p2").replace(
        "b/normal/p3.png,b,normal,p3", "b/normal/p3.png,b,normal,"
    )
    with pytest.raises(ManifestError) as err:
        load_manifest(_write(small, text))
    msg = str(err.value)
    assert "2 problems" in msg
    assert "row 2: empty site" in msg
    assert "row 3: empty patient_id" in msg


def test_many_problems_are_capped(small: Path):
    rows = "".join(f"nope{i}.png,a,normal,p{i}\n" for i in range(15))
    with pytest.raises(ManifestError) as err:
        load_manifest(_write(small, "path,site,label,patient_id\n" + rows))
    assert len(err.value.problems) == 15
    assert "... and 5 more" in str(err.value)


@pytest.mark.parametrize(
    ("header", "bad", "good"),
    [
        ("path,sites,label,patient_id", "sites", "site"),
        ("path,Site,label,patient_id", "Site", "site"),
        ("path,site,label,patientid", "patientid", "patient_id"),
        ("path,site,label,patient_id,nodes", "nodes", "node"),
        ("path,site,label,patient_id,Split", "Split", "split"),
    ],
)
def test_misspelled_column_is_named(small: Path, header: str, bad: str, good: str):
    body = GOOD.split("\n", 1)[1]
    if header.count(",") == 4:
        body = "".join(line + ",x\n" for line in body.splitlines())
    with pytest.raises(ManifestError) as err:
        load_manifest(_write(small, header + "\n" + body))
    msg = str(err.value)
    assert f"'{bad}'" in msg and f"'{good}'" in msg


def test_extra_columns_are_kept(small: Path):
    text = GOOD.replace("patient_id\n", "patient_id,age,sex\n")
    text = "\n".join(line + ",61,F" if i else line for i, line in enumerate(text.splitlines()))
    df = load_manifest(_write(small, text + "\n"))
    assert df["age"].tolist() == ["61"] * 4 and df["sex"].tolist() == ["F"] * 4
    assert df["age"].dtype != np.int64  # read as text, as written


def test_repeated_column(small: Path):
    text = GOOD.replace("patient_id\n", "patient_id,site\n")
    text = "\n".join(ln + ",a" if i else ln for i, ln in enumerate(text.splitlines()))
    with pytest.raises(ManifestError, match=r"\['site'\] appear twice"):
        load_manifest(_write(small, text + "\n"))


def test_unknown_mask_column(small: Path):
    with pytest.raises(ManifestError, match="mask_column 'roi'"):
        load_manifest(_write(small, GOOD), mask_column="roi")


def test_labels_empty_only_for_whole_column(small: Path):
    partly = GOOD.replace("b/tb/p4.png,b,tb,p4", "b/tb/p4.png,b,,p4")
    with pytest.raises(ManifestError, match=r"row 4 \(spreadsheet row 5\): empty label"):
        load_manifest(_write(small, partly))
    none = "".join(
        ",".join(v if j != 2 else "" for j, v in enumerate(line.split(","))) + "\n"
        if i else line + "\n"
        for i, line in enumerate(GOOD.splitlines())
    )
    df = load_manifest(_write(small, none))
    assert (df["label"] == "").all()
    assert (binary_targets(df) == -1).all()


def test_duplicate_file_and_bad_split(small: Path):
    text = "path,site,label,patient_id,split\n" \
           "a/normal/p1.png,a,normal,p1,train\n" \
           "a/normal/./p1.png,a,normal,p1,test\n" \
           "a/tb/p2.png,a,tb,p2,holdout\n"
    with pytest.raises(ManifestError) as err:
        load_manifest(_write(small, text))
    msg = str(err.value)
    assert "row 2: same file as row 1" in msg
    assert "row 3: split 'holdout'" in msg


def test_node_defaults_to_site_where_empty(small: Path):
    text = GOOD.replace("patient_id\n", "patient_id,node\n")
    nodes = ["n1", "", "n2", ""]
    lines = text.splitlines()
    text = "\n".join([lines[0]] + [f"{ln},{n}" for ln, n in zip(lines[1:], nodes, strict=True)])
    df = load_manifest(_write(small, text + "\n"))
    assert df["node"].tolist() == ["n1", "a", "n2", "b"]


def test_save_then_load_round_trip(small: Path):
    df = load_manifest(_write(small, GOOD))
    df["split"] = ["train", "train", "test", "test"]
    out = save_manifest(df, small / "elsewhere" / "m.csv")
    raw = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(raw.columns[:6]) == ["path", "site", "label", "patient_id", "node", "split"]
    assert "relpath" not in raw.columns
    assert raw["path"].iloc[0] == "../a/normal/p1.png"
    assert [p.name for p in out.parent.iterdir()] == ["m.csv"]  # no temp file left
    back = load_manifest(out)
    assert back["path"].tolist() == df["path"].tolist()
    assert back["split"].tolist() == df["split"].tolist()


def test_safe_relpath_never_escapes(tmp_path: Path):
    assert safe_relpath(tmp_path / "a" / "b.png", tmp_path) == "a/b.png"
    outside = safe_relpath(tmp_path.parent / "x.png", tmp_path / "sub")
    assert outside.startswith("_outside/") and ".." not in outside.split("/")


# --- folder discovery -------------------------------------------------------------------


def test_unlabelled_folder_with_extensionless_dicom(tmp_path: Path):
    _touch(tmp_path / "siteA" / "img1.png")
    _touch(tmp_path / "siteA" / "sub" / "IM0002", b"\0" * 128 + b"DICM" + b"\0" * 8)
    _touch(tmp_path / "siteB" / "img1.nii.gz")
    _touch(tmp_path / "siteB" / "notes.txt", b"hello")
    _touch(tmp_path / "siteB" / ".hidden.png")
    df = manifest_from_folder(tmp_path)
    assert df["relpath"].tolist() == ["siteA/img1.png", "siteA/sub/IM0002", "siteB/img1.nii.gz"]
    assert (df["label"] == "").all()
    # stem 'img1' at two sites: qualified by site so they are not one patient
    assert df["patient_id"].tolist() == ["siteA:img1", "IM0002", "siteB:img1"]


def test_labelled_detection_and_forced_layout(small: Path):
    df = manifest_from_folder(small)
    assert df["label"].tolist() == ["normal", "tb", "normal", "tb"]
    assert df["patient_id"].tolist() == ["p1", "p2", "p3", "p4"]
    _touch(small / "a" / "loose.png")
    assert (manifest_from_folder(small)["label"] == "").all()  # mixed depth -> unlabelled
    with pytest.raises(ValueError, match="directly in a site folder"):
        manifest_from_folder(small, labelled=True)


def test_folder_errors(tmp_path: Path):
    with pytest.raises(NotADirectoryError):
        manifest_from_folder(tmp_path / "nothing")
    _touch(tmp_path / "a" / "notes.txt")
    with pytest.raises(ValueError, match="no images"):
        manifest_from_folder(tmp_path)


# --- binary labels ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "positive"),
    [
        (["normal", "tb", "tb"], "tb"),
        (["0", "1"], "1"),
        (["No", "Yes"], "Yes"),
        (["Healthy", "fracture"], "fracture"),
        (["tb"], "tb"),
    ],
)
def test_positive_label(labels: list[str], positive: str):
    assert positive_label(labels) == positive


@pytest.mark.parametrize("labels", [["a", "b"], ["normal", "negative"], ["a", "b", "c"], []])
def test_positive_label_ambiguous(labels: list[str]):
    with pytest.raises(ValueError):
        positive_label(labels)


def test_binary_targets():
    df = pd.DataFrame({"label": ["normal", "tb", "tb", "normal"]})
    assert binary_targets(df).tolist() == [0, 1, 1, 0]
    assert binary_targets(df.iloc[[0, 3]]).tolist() == [0, 0]  # negatives-only subset
    assert binary_targets(df, positive="normal").tolist() == [1, 0, 0, 1]
    assert binary_targets(pd.DataFrame({"label": ["", ""]})).tolist() == [-1, -1]
