"""Batch harmonization: exact identity on every format, bad files logged, resume."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pydicom

from harmonize.apply import LOG_NAME, apply_translator
from harmonize.cli import main
from harmonize.data.io import read_image
from harmonize.translators import load_translator


def _log(out):
    with open(out / LOG_NAME, newline="") as fh:
        return list(csv.DictReader(fh))


def test_identity_apply_is_exact_for_every_format(mixed_folder, tmp_path):
    out = tmp_path / "out"
    summary = apply_translator(load_translator("identity"), mixed_folder, out, progress=False)
    sources = sorted(p for p in mixed_folder.rglob("*") if p.is_file())
    assert summary.ok == len(sources) and summary.errors == 0
    for src in sources:
        dst = out / src.relative_to(mixed_folder)
        a, b = read_image(src), read_image(dst)
        assert b.array.dtype == a.array.dtype, src.name
        np.testing.assert_array_equal(b.array, a.array, err_msg=src.name)
        if a.format == "dicom":
            orig, new = pydicom.dcmread(src), pydicom.dcmread(dst)
            for tag in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID",
                        "StudyDate", "AccessionNumber"):
                assert new.get(tag) == orig.get(tag), (src.name, tag)
            assert new.SOPInstanceUID != orig.SOPInstanceUID


def test_bad_files_are_logged_the_rest_written_and_resume_does_no_work_twice(
        mixed_folder, tmp_path):
    good = sorted(p.relative_to(mixed_folder) for p in mixed_folder.rglob("*") if p.is_file())
    (mixed_folder / "corrupt.png").write_bytes((mixed_folder / "x16.png").read_bytes()[:120])
    (mixed_folder / "readme.txt").write_text("not an image")
    out = tmp_path / "out"

    first = apply_translator(load_translator("identity"), mixed_folder, out, progress=False)
    assert (first.ok, first.skipped, first.errors) == (len(good), 1, 1)
    rows = {r["input"].rsplit("/", 1)[-1]: r for r in _log(out)}
    assert rows["corrupt.png"]["status"] == "error"
    assert "corrupt.png" in rows["corrupt.png"]["reason"]
    assert rows["readme.txt"]["status"] == "skipped"  # logged, not an error: not an image
    assert "not an image file (.txt" in rows["readme.txt"]["reason"]
    for rel in good:
        assert (out / rel).is_file()
    assert not list(out.rglob(".*partial*")), "no temporary file may be left behind"

    stamps = {rel: (out / rel).stat().st_mtime_ns for rel in good}
    second = apply_translator(load_translator("identity"), mixed_folder, out, resume=True,
                              progress=False)
    assert (second.ok, second.skipped, second.errors) == (0, len(good) + 1, 1)
    assert {rel: (out / rel).stat().st_mtime_ns for rel in good} == stamps
    assert len(_log(out)) == 2 * (len(good) + 2)  # the log keeps both runs


def test_cli_exit_codes(mixed_folder, tmp_path, capsys):
    (mixed_folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert main(["apply", "-q", "--model", "identity", str(mixed_folder),
                 str(tmp_path / "a")]) == 0
    assert main(["apply", "-q", "--strict", "--model", "identity", str(mixed_folder),
                 str(tmp_path / "b")]) == 1
    assert "--strict" in capsys.readouterr().err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    shutil.copy(mixed_folder / "corrupt.png", only_bad / "x.png")
    assert main(["apply", "-q", "--model", "identity", str(only_bad), str(tmp_path / "c")]) == 1
    assert main(["apply", "-q", "--model", str(tmp_path / "missing"), str(mixed_folder),
                 str(tmp_path / "d")]) == 1
    assert "no such checkpoint" in capsys.readouterr().err


def test_processes_of_a_multi_device_launch_split_the_files(mixed_folder, tmp_path,
                                                             monkeypatch):
    """Under accelerate/torchrun (RANK, WORLD_SIZE set) each process takes every n-th
    file: together they write every file exactly once, each with its own log."""
    out = tmp_path / "out"
    done = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        s = apply_translator(load_translator("identity"), mixed_folder, out, progress=False)
        done.append(s.ok)
    n_files = len([p for p in mixed_folder.rglob("*") if p.is_file()])
    assert sum(done) == n_files and min(done) >= 1
    logs = sorted(p.name for p in out.glob("apply_log*.csv"))
    assert logs == ["apply_log.csv", "apply_log.rank1.csv"]
    rows = [r for name in logs for r in csv.DictReader(open(out / name, newline=""))]
    assert len(rows) == n_files == len({r["input"] for r in rows})


def test_a_dataset_root_and_a_site_folder_get_their_sites_from_the_manifest(tmp_path):
    """The synthetic benchmark's root holds masks/, reference/ and manifest.csv: only the
    manifest's images are harmonized; a site's own folder takes its site from the
    manifest above it, not from its label subfolders."""
    from harmonize.synth import generate

    synth = tmp_path / "synth"
    info = generate(synth, sites=2, per_site=4, size=32, seed=0, progress=False)
    root = apply_translator(load_translator("identity"), synth, tmp_path / "all",
                            progress=False)
    assert (root.ok, root.skipped, root.errors) == (info["n_images"], 0, 0)
    assert {r["site"] for r in _log(tmp_path / "all")} == {"site_a", "site_b"}
    assert not (tmp_path / "all" / "reference").exists()
    one = apply_translator(load_translator("identity"), synth / "site_b", tmp_path / "b",
                           progress=False)
    assert one.ok == 4 and {r["site"] for r in _log(tmp_path / "b")} == {"site_b"}


def test_log_reasons_name_the_file_never_a_temp_file_or_a_bare_internal_error(
        tmp_path, monkeypatch):
    """A failure harmonize did not foresee is said to be one, with the file; a write that
    fails names the output, not the temporary file it was going to."""
    import SimpleITK as sitk

    import harmonize.apply
    import harmonize.data.io

    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 8), 7, np.uint8)),
                        str(tmp_path / "in" / name))
    real_read, real_write = harmonize.apply.read_image, sitk.WriteImage

    def read(path):
        if path.name == "a.png":
            raise TypeError("in method 'Image_GetMetaData', argument 2 of type 'std::string'")
        return real_read(path)

    def write(image, path, *args, **kwargs):
        raise RuntimeError(f"Exception thrown in SimpleITK WriteImage: itkPNGImageIO.cxx:391:\n"
                           f"ITK ERROR: PNGImageIO(0x1): Could not open {path} for writing."
                           "\nReason: No space left on device")

    monkeypatch.setattr(harmonize.apply, "read_image", read)
    monkeypatch.setattr(harmonize.data.io.sitk, "WriteImage", write)
    summary = apply_translator(load_translator("identity"), tmp_path / "in", tmp_path / "out",
                               progress=False)
    monkeypatch.setattr(harmonize.data.io.sitk, "WriteImage", real_write)
    assert summary.errors == 2
    rows = {r["input"].rsplit("/", 1)[-1]: r["reason"] for r in _log(tmp_path / "out")}
    assert rows["a.png"] == (f"{tmp_path / 'in' / 'a.png'}: reading failed unexpectedly "
                             "(TypeError: in method 'Image_GetMetaData', argument 2 of type "
                             "'std::string'); please report it with the file")
    assert rows["b.png"] == (f"{tmp_path / 'out' / 'b.png'}: not written as PNG: Reason: No "
                             "space left on device (check the free disk space and the "
                             "folder's permissions)")
    assert not list((tmp_path / "out").rglob(".*partial*"))
