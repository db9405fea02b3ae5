"""Inputs a careful user still meets (issue 19): odd suffix case, non-image manifest rows,
other CSV separators, temp files left by a killed run."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from harmonize.apply import apply_translator
from harmonize.data.io import read_image
from harmonize.data.manifest import ManifestError, load_manifest
from harmonize.translators import load_translator


def _png(path, value=1000):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 50 + value).astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    return arr


def test_an_upper_case_suffix_is_written_in_kind(tmp_path):
    arr = _png(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "a.png").rename(tmp_path / "in" / "A.Png")
    summary = apply_translator(load_translator("identity"), tmp_path / "in", tmp_path / "out",
                               progress=False)
    assert (summary.ok, summary.errors) == (1, 0)
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "A.Png").array, arr)


def test_a_manifest_row_that_is_not_an_image_is_refused(tmp_path):
    _png(tmp_path / "data" / "a.png")
    (tmp_path / "secret.txt").write_text("root:x:0:0")
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("path,site,label,patient_id\na.png,s1,0,p1\n../secret.txt,s2,1,p2\n")
    with pytest.raises(ManifestError, match=r"row 2.*'../secret.txt' is not an image \(.txt"):
        load_manifest(manifest)


@pytest.mark.parametrize("sep", [";", "\t"])
def test_another_separator_gets_one_message_naming_it(tmp_path, sep):
    _png(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(sep.join(["path", "site", "label", "patient_id"]) + "\n"
                        + sep.join(["a.png", "s1", "0", "p1"]) + "\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    message = str(info.value)
    assert f"separated by {sep!r}" in message and message.count("missing column") == 0


def test_resume_removes_temp_files_of_a_killed_run(tmp_path):
    _png(tmp_path / "in" / "s1" / "a.png")
    _png(tmp_path / "in" / "s1" / "b.png")
    out = tmp_path / "out"
    apply_translator(load_translator("identity"), tmp_path / "in", out, progress=False)
    stale = out / "s1" / ".b.x1y2.partial.png"  # what kill -9 mid-write leaves
    stale.write_bytes(b"half a file")
    (out / "s1" / "b.png").unlink()
    again = apply_translator(load_translator("identity"), tmp_path / "in", out, resume=True,
                             progress=False)
    assert (again.ok, again.skipped) == (1, 1)
    assert not stale.exists() and (out / "s1" / "b.png").is_file()


def test_training_on_a_manifest_with_one_bad_image_names_the_row(tmp_path):
    from harmonize.configs import ConfigError
    from harmonize.translators.cyclegan import load_config, train_cyclegan

    for k in range(4):
        _png(tmp_path / "data" / f"{k}.png", value=100 * k)
    (tmp_path / "data" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("path,site,label,patient_id\n" + "".join(
        f"{k}.png,{s},0,p{k}\n" for k, s in enumerate(["s1", "s1", "s2", "s2"])))
    config = load_config(None, {"data.manifest": manifest, "data.reference_site": "s1",
                                "train.out": tmp_path / "run", "train.progress": False})
    with pytest.raises(ConfigError, match=r"manifest row 3: .*2\.png cannot be read"):
        train_cyclegan(config)


def test_jpeg_identity_is_as_close_as_jpeg_allows(tmp_path):
    from harmonize.synth import make_phantom

    x = make_phantom("xray", 128, False, np.random.default_rng(0)).ideal
    x = np.rint((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(x), str(tmp_path / "in" / "a.jpg"))
    apply_translator(load_translator("identity"), tmp_path / "in", tmp_path / "out",
                     progress=False)
    a = read_image(tmp_path / "in" / "a.jpg").array.astype(int)
    b = read_image(tmp_path / "out" / "a.jpg").array.astype(int)
    assert np.abs(a - b).max() <= 1  # at the default quality: 2 here, 3-7 on real files


def test_a_header_claiming_a_huge_image_is_refused_without_reading_it(tmp_path):
    import resource
    import struct

    from harmonize.data.io import ImageReadError

    # a valid NIfTI-1 header of a 32767 x 32767 float32 image, and 1 KB of data
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 2, 32767, 32767, 1, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 16, 32)  # datatype float32, bitpix
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352)  # vox_offset
    hdr[344:348] = b"n+1\0"
    path = tmp_path / "huge.nii"
    path.write_bytes(bytes(hdr) + b"\0" * 4 + b"\0" * 1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageReadError, match=r"huge.nii: its header claims 32767 x 32767"):
        read_image(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KB


def test_a_truncated_uncompressed_nifti_is_refused(tmp_path):
    from harmonize.data.io import ImageReadError

    img = sitk.GetImageFromArray(np.arange(64 * 64, dtype=np.int16).reshape(64, 64))
    sitk.WriteImage(img, str(tmp_path / "ok.nii"))
    data = (tmp_path / "ok.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) - 1000])
    assert read_image(tmp_path / "ok.nii").shape == (64, 64)
    with pytest.raises(ImageReadError, match="cut.nii: truncated"):
        read_image(tmp_path / "cut.nii")


@pytest.mark.parametrize("name", ["f.tif", "f.mha", "f.nii"])
def test_nan_or_inf_pixels_are_refused_not_written_wrong(tmp_path, name):
    from harmonize.data.io import ImageReadError

    x = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    x[3, 3] = np.nan if name != "f.nii" else np.inf
    sitk.WriteImage(sitk.GetImageFromArray(x), str(tmp_path / name))
    with pytest.raises(ImageReadError, match=f"{name}: 1 pixel\\(s\\) are NaN or infinite"):
        read_image(tmp_path / name)
    summary = apply_translator(load_translator("identity"), tmp_path, tmp_path / "out",
                               progress=False)
    assert (summary.ok, summary.errors) == (0, 1)  # logged as an error, nothing written


def test_32_bit_integers_beyond_float32_are_refused(tmp_path):
    from harmonize.data.io import ImageReadError

    x = np.full((8, 8), 3_000_000_000, dtype=np.uint32)
    sitk.WriteImage(sitk.GetImageFromArray(x), str(tmp_path / "big.mha"))
    with pytest.raises(ImageReadError, match="up to 3,000,000,000: beyond 16,777,216"):
        read_image(tmp_path / "big.mha")
    small = np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000
    sitk.WriteImage(sitk.GetImageFromArray(small), str(tmp_path / "small.mha"))
    np.testing.assert_array_equal(read_image(tmp_path / "small.mha").array, small)


def test_alpha_channels_are_refused(tmp_path):
    from harmonize.data.io import ImageReadError

    rgba = np.full((8, 8, 4), 120, dtype=np.uint8)
    rgba[..., 3] = 255
    sitk.WriteImage(sitk.GetImageFromArray(rgba, isVector=True), str(tmp_path / "a.png"))
    with pytest.raises(ImageReadError, match="a.png: an image with an alpha"):
        read_image(tmp_path / "a.png")


def test_palette_colour_dicom_is_refused(tmp_path):
    from pydicom.data import get_testdata_file

    from harmonize.data.io import ImageReadError

    source = get_testdata_file("examples_palette.dcm", download=False)  # PALETTE COLOR
    if source is None:
        pytest.skip("pydicom's examples_palette.dcm not bundled")
    with pytest.raises(ImageReadError, match="PALETTE COLOR, not grayscale"):
        read_image(source)


def _dicom(name):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's {name} not bundled")
    return path


def test_a_big_endian_dicom_is_written_little_endian_with_its_values(tmp_path):
    import pydicom

    source = _dicom("MR_small_bigendian.dcm")
    (tmp_path / "in").mkdir()
    shutil_copy(source, tmp_path / "in" / "be.dcm")
    summary = apply_translator(load_translator("identity"), tmp_path / "in", tmp_path / "out",
                               progress=False)
    assert (summary.ok, summary.errors) == (1, 0)
    out = pydicom.dcmread(tmp_path / "out" / "be.dcm")
    assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    np.testing.assert_array_equal(out.pixel_array, pydicom.dcmread(source).pixel_array)


def test_dicom_history_is_kept_and_the_writer_named(tmp_path):
    import pydicom

    ds = pydicom.dcmread(_dicom("CT_small.dcm"))
    ds.DerivationDescription = "JPEG 2000 irreversible (lossy) 10:1"
    ds.SeriesDescription = "thorax " * 8 + "end"  # 59 characters
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "ct.dcm")
    apply_translator(load_translator("identity"), tmp_path / "in", tmp_path / "out",
                     progress=False)
    out = pydicom.dcmread(tmp_path / "out" / "ct.dcm")
    assert out.DerivationDescription.startswith("JPEG 2000 irreversible (lossy) 10:1; ")
    assert "identity translator" in out.DerivationDescription
    assert len(out.SeriesDescription) <= 64 and out.SeriesDescription.endswith("thorax harmonized")
    assert out.file_meta.ImplementationClassUID != ds.file_meta.ImplementationClassUID
    assert out.file_meta.ImplementationVersionName.startswith("HARMONIZE_")


def test_one_bit_dicom_is_refused(tmp_path):
    import pydicom

    from harmonize.data.io import ImageReadError

    ds = pydicom.dcmread(_dicom("CT_small.dcm"))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.save_as(tmp_path / "seg.dcm")
    with pytest.raises(ImageReadError, match="seg.dcm: 1-bit"):
        read_image(tmp_path / "seg.dcm")


def shutil_copy(a, b):
    import shutil

    shutil.copy(a, b)


def test_one_image_that_fails_translation_costs_only_itself(tmp_path):
    from harmonize.translators.fourier import FourierAmplitudeMatching

    rng = np.random.default_rng(0)
    images = [(rng.random((32, 32)).astype(np.float32), "ref") for _ in range(3)]
    model = FourierAmplitudeMatching().fit(images, "ref")  # a 7 x 7 block: 8 px images pass
    for k in range(3):
        _png(tmp_path / "in" / "s1" / f"{k}.png", value=100 * k)
    # too small for the low-frequency block: transform refuses it, the others go through
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 40), np.uint16)),
                    str(tmp_path / "in" / "s1" / "tiny.png"))
    summary = apply_translator(model, tmp_path / "in", tmp_path / "out", batch_size=8,
                               progress=False)
    assert (summary.ok, summary.errors) == (3, 1)
    assert summary.error_files == [str(tmp_path / "in" / "s1" / "tiny.png")]


def test_messages_say_what_is_wrong_with_the_file(tmp_path):
    from PIL import Image

    from harmonize.data.io import ImageReadError

    grey_alpha = np.zeros((8, 8, 2), np.uint8)
    grey_alpha[..., 1] = 255
    Image.fromarray(grey_alpha, mode="LA").save(tmp_path / "la.png")
    with pytest.raises(ImageReadError, match=r"la.png: a pixel layout .*grey \+ alpha"):
        read_image(tmp_path / "la.png")
    data = open(_dicom("CT_small.dcm"), "rb").read()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 3000])
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "cut.dcm")
    assert "truncated or corrupt" in str(info.value) and "pylibjpeg" not in str(info.value)


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.jpg"])
def test_truncated_compressed_files_are_refused(tmp_path, name):
    from harmonize.data.io import ImageReadError

    x = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    whole = tmp_path / name.replace("cut", "whole")
    sitk.WriteImage(sitk.GetImageFromArray(x), str(whole))
    data = whole.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    assert read_image(whole).shape == (64, 64)
    with pytest.raises(ImageReadError, match=f"{name}: truncated"):
        read_image(tmp_path / name)


def test_a_planar_multi_sample_tiff_is_refused_not_cut_to_8_bits(tmp_path):
    import tifffile

    from harmonize.data.io import ImageReadError

    x = (np.arange(3 * 8 * 16).reshape(3, 8, 16) * 50).astype(np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", x, planarconfig="separate", photometric="rgb")
    with pytest.raises(ImageReadError, match="planar.tif: a TIFF of 3 samples per pixel "
                                             "stored plane by plane"):
        read_image(tmp_path / "planar.tif")
    grey = (np.arange(8 * 16).reshape(8, 16) * 300).astype(np.uint16)
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    np.testing.assert_array_equal(read_image(tmp_path / "grey.tif").array, grey)


def test_300_mixed_files_every_valid_one_written_every_malformed_one_an_error(tmp_path):
    import pandas as pd

    from harmonize.synth.hostile import write_hostile_files

    table = write_hostile_files(tmp_path, n=300, seed=0)
    summary = apply_translator(load_translator("identity"), tmp_path / "files",
                               tmp_path / "out", progress=False)
    log = pd.read_csv(tmp_path / "out" / "apply_log.csv")
    log["name"] = log["input"].str.rsplit("/", n=1).str[-1]
    got = table.merge(log[["name", "status", "reason"]], on="name", how="left")
    assert got["status"].notna().all()  # every file has its row
    wrong = got[got["status"] != got["expected"]]
    assert wrong.empty, wrong[["name", "status", "reason"]].head(10).to_string()
    assert summary.ok == (table["expected"] == "ok").sum()
    for row in got[got["expected"] == "ok"].itertuples():
        a = read_image(tmp_path / "files" / row.site / row.name).array.astype(np.float64)
        b = read_image(tmp_path / "out" / row.site / row.name).array.astype(np.float64)
        tolerance = 2 if row.name.endswith(".jpg") else 0  # JPEG: lossy by nature
        assert np.abs(a - b).max() <= tolerance, row.name


def test_dicom_outputs_add_no_dciodvfy_error(tmp_path):
    """dicom3tools' validator finds no error in an output that it did not find in its
    input (CT, MR, a big-endian MR, a JPEG-compressed bone scan)."""
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) not installed; .ci/run installs it")
    (tmp_path / "in").mkdir()
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "JPGExtended.dcm"]
    for name in names:
        shutil.copy(_dicom(name), tmp_path / "in" / name)
    summary = apply_translator(load_translator("identity"), tmp_path / "in", tmp_path / "out",
                               progress=False)
    assert summary.ok == len(names)

    def errors(path) -> set[str]:
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        return {line for line in (run.stdout + run.stderr).splitlines()
                if line.startswith("Error")}

    for name in names:
        new = errors(tmp_path / "out" / name) - errors(tmp_path / "in" / name)
        assert not new, (name, new)


def _jpeg(path, seed=0):
    from harmonize.synth import make_phantom

    x = make_phantom("xray", 64, False, np.random.default_rng(seed)).ideal
    x = np.rint((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(x), str(path))
    return path.read_bytes()


@pytest.mark.parametrize("damage,says", [
    ("cut_scan", "premature end of data segment"),
    ("junk_before_end", "extraneous bytes before marker 0xd9"),
])
def test_a_jpeg_whose_coded_data_are_damaged_is_refused(tmp_path, damage, says):
    """libjpeg decodes such files with a warning only, guessing the pixels (another decoder
    guesses otherwise by up to 255 levels): refused, never written as ok."""
    from harmonize.data.io import ImageReadError

    (tmp_path / "in").mkdir()
    data = _jpeg(tmp_path / "in" / "good.jpg")
    scan = data.index(b"\xff\xda")
    damaged = (data[: scan + (len(data) - scan) // 2] + b"\xff\xd9" if damage == "cut_scan"
               else data[:-2] + bytes(40) + b"\xff\xd9")
    (tmp_path / "in" / "bad.jpg").write_bytes(damaged)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "in" / "bad.jpg"))).size
    with pytest.raises(ImageReadError, match=f"bad.jpg: damaged JPEG data .*{says}"):
        read_image(tmp_path / "in" / "bad.jpg")
    summary = apply_translator(load_translator("identity"), tmp_path / "in", tmp_path / "out",
                               progress=False)
    assert (summary.ok, summary.errors) == (1, 1)
    assert summary.error_files == [str(tmp_path / "in" / "bad.jpg")]


def test_reading_a_jpeg_passes_other_output_on(tmp_path, capfd):
    import threading

    _jpeg(tmp_path / "good.jpg")
    printer = threading.Thread(target=lambda: [print("progress", k) for k in range(200)])
    printer.start()
    for _ in range(5):
        read_image(tmp_path / "good.jpg")
    printer.join()
    assert capfd.readouterr().out.count("progress") == 200


@pytest.mark.parametrize("name", ["f.tif", "f.nii", "f.mha", "f.nii.gz"])
def test_float32_images_come_out_of_identity_bit_exact(tmp_path, name):
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 1, (24, 32)) * 987.654 + 0.001).astype(np.float32)
    (tmp_path / "in").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(x), str(tmp_path / "in" / name))
    apply_translator(load_translator("identity"), tmp_path / "in", tmp_path / "out",
                     progress=False)
    out = read_image(tmp_path / "out" / name).array
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)


def test_an_mha_header_entry_that_is_not_text_is_dropped_and_logged(tmp_path):
    import pandas as pd

    (tmp_path / "in").mkdir()
    arr = _png(tmp_path / "in" / "a.png")
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "in" / "a.mha"))
    (tmp_path / "in" / "a.png").unlink()
    data = (tmp_path / "in" / "a.mha").read_bytes()
    (tmp_path / "in" / "a.mha").write_bytes(
        data.replace(b"ElementType", b"Stati\xf3n = 3\nSite = B\nElementType", 1))
    summary = apply_translator(load_translator("identity"), tmp_path / "in", tmp_path / "out",
                               progress=False)
    assert (summary.ok, summary.errors) == (1, 0)
    log = pd.read_csv(tmp_path / "out" / "apply_log.csv")
    assert log["reason"][0] == ("source repaired: header entry 'Stati\\xf3n': dropped, it "
                                "is not text")
    out = sitk.ReadImage(str(tmp_path / "out" / "a.mha"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), arr)
    assert out.GetMetaData("Site") == "B"  # the readable entries are kept
