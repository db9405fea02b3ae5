"""DICOM files whose pixels are fine but whose header has one damaged element (issue 29):
written with the element repaired, emptied or dropped and the change noted, or refused
naming the element and the fix when the output would be invalid."""

from __future__ import annotations

import shutil
import struct
import subprocess

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from conftest import dicom_file
from harmonize.apply import apply_translator
from harmonize.data.io import ImageReadError, read_image, write_image
from harmonize.translators import load_translator


def _raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    """An element as a damaged file holds it: bytes pydicom writes back unchecked."""
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _ct(path, *raw: RawDataElement, drop: tuple[str, ...] = ()):
    """CT_small.dcm (128 x 128, explicit VR little endian) with damaged elements."""
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    for elem in raw:
        ds[elem.tag] = elem
    for keyword in drop:
        delattr(ds, keyword)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=not drop)
    return path


def _pixels(path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def test_an_unknown_vr_is_read_with_the_dictionary_vr_and_written(tmp_path):
    # Acquisition Matrix with the VR bytes 0x55 0x13, as found in an archive
    src = _ct(tmp_path / "vr.dcm", _raw(0x00181310, "U\x13", b"\0\0\x80\0\x80\0\0\0"))
    with pytest.raises(NotImplementedError):  # what used to end the write
        pydicom.dcmread(src).AcquisitionMatrix  # noqa: B018
    img = read_image(src)
    assert img.repairs == ["(0018,1310) Acquisition Matrix: unknown VR 'U\\x13' read as "
                           "its dictionary VR US"]
    out = pydicom.dcmread(write_image(img, img.array, tmp_path / "out.dcm", "test"))
    assert out["AcquisitionMatrix"].VR == "US" and out.AcquisitionMatrix == [0, 128, 128, 0]
    assert out.DerivationDescription.endswith("source header repaired: " + img.repairs[0])
    np.testing.assert_array_equal(out.pixel_array, _pixels(src))


def test_a_stray_byte_after_a_decimal_string_is_trimmed(tmp_path):
    src = _ct(tmp_path / "ds.dcm", _raw(0x00280030, "DS", b"0.66146\x18\\0.66146 "))
    img = read_image(src)
    assert img.spacing == (0.66146, 0.66146)
    assert img.repairs == ["(0028,0030) Pixel Spacing: stray bytes trimmed "
                           "('0.66146\\x18' -> '0.66146')"]
    out = pydicom.dcmread(write_image(img, img.array, tmp_path / "out.dcm"))
    assert [str(v) for v in out.PixelSpacing] == ["0.66146", "0.66146"]


def test_a_missing_sop_instance_uid_gets_a_new_one_that_a_rerun_repeats(tmp_path):
    src = _ct(tmp_path / "nosop.dcm", drop=("SOPInstanceUID",))
    ds = pydicom.dcmread(src)
    del ds.file_meta.MediaStorageSOPInstanceUID  # no trace of it anywhere
    ds.save_as(src, enforce_file_format=False)
    img = read_image(src)
    assert img.repairs == ["(0008,0018) SOP Instance UID: missing, the output has a new one"]
    a = pydicom.dcmread(write_image(img, img.array, tmp_path / "a.dcm"))
    b = pydicom.dcmread(write_image(read_image(src), img.array, tmp_path / "b.dcm"))
    assert a.SOPInstanceUID and a.SOPInstanceUID == b.SOPInstanceUID
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID


def test_what_cannot_be_repaired_is_emptied_or_dropped_and_noted(tmp_path):
    src = _ct(tmp_path / "bad.dcm", _raw(0x00180050, "DS", b"abc "),  # Slice Thickness
              _raw(0x00200013, "IS", b"\x007 "))  # Instance Number after a NUL byte
    ds = pydicom.dcmread(src)  # and a private element with an unknown VR
    tag = ds.private_block(0x0099, "ACME", create=True).get_tag(0x01)
    ds.add_new(tag, "SH", "xy")
    ds.save_as(src, enforce_file_format=True)
    data = bytearray(src.read_bytes())
    at = data.index(struct.pack("<HH", tag.group, tag.element) + b"SH")
    data[at + 4 : at + 6] = b"Q\x01"
    src.write_bytes(bytes(data))
    img = read_image(src)
    assert img.repairs == [
        "(0018,0050) Slice Thickness: emptied, 'abc' is not a valid DS",
        "(0020,0013) Instance Number: stray bytes trimmed ('\\x007' -> '7')",
        f"{tag} (private): dropped, it cannot be decoded (Unknown Value Representation "
        f"'0x51 0x01' in tag {tag})",
    ]
    out = pydicom.dcmread(write_image(img, img.array, tmp_path / "out.dcm"))
    assert out["SliceThickness"].is_empty and out.InstanceNumber == 7
    assert tag not in out and out[0x00990010].value == "ACME"


@pytest.mark.parametrize("raw,match", [
    (_raw(0x00281053, "DS", b"1.x "), r"\(0028,1053\) Rescale Slope holds '1.x', not a "
                                       r"valid DS \(set a valid value, e.g. dcmodify -m "
                                       r"\"\(0028,1053\)=<value>\" slope.dcm"),
    (_raw(0x00280010, "U\x13", b"\x80"), r"\(0028,0010\) Rows cannot be decoded"),
])
def test_an_element_the_pixels_need_damaged_beyond_repair_is_refused(tmp_path, raw, match):
    src = _ct(tmp_path / "slope.dcm", raw)
    with pytest.raises(ImageReadError, match=match):
        read_image(src)


def test_a_missing_transfer_syntax_is_taken_from_the_encoding(tmp_path):
    src = _ct(tmp_path / "nots.dcm")
    ds = pydicom.dcmread(src)
    del ds.file_meta.TransferSyntaxUID
    ds.save_as(src, enforce_file_format=False)
    img = read_image(src)
    assert img.repairs == ["(0002,0010) Transfer Syntax UID: missing, set to Explicit VR "
                           "Little Endian"]
    np.testing.assert_array_equal(img.array, read_image(dicom_file("CT_small.dcm")).array)


def _damaged_folder(tmp_path):
    ins = tmp_path / "in"
    _ct(ins / "vr.dcm", _raw(0x00181310, "U\x13", b"\0\0\x80\0\x80\0\0\0"))
    _ct(ins / "ds.dcm", _raw(0x00280030, "DS", b"0.66146\x18\\0.66146 "))
    _ct(ins / "nosop.dcm", drop=("SOPInstanceUID",))
    _ct(ins / "slope.dcm", _raw(0x00281053, "DS", b"1.x "))
    return ins


def test_apply_writes_repaired_files_and_logs_each_change(tmp_path):
    ins = _damaged_folder(tmp_path)
    summary = apply_translator(load_translator("identity"), ins, tmp_path / "out",
                               progress=False)
    assert (summary.ok, summary.errors) == (3, 1)
    log = pd.read_csv(tmp_path / "out" / "apply_log.csv").set_index("input")
    reasons = {name: log.loc[str(ins / name), "reason"] for name in
               ("vr.dcm", "ds.dcm", "nosop.dcm", "slope.dcm")}
    assert reasons["vr.dcm"].startswith("source repaired: (0018,1310) Acquisition Matrix")
    assert reasons["ds.dcm"].startswith("source repaired: (0028,0030) Pixel Spacing")
    assert reasons["nosop.dcm"] == ("source repaired: (0008,0018) SOP Instance UID: missing, "
                                    "the output has a new one")
    assert log.loc[str(ins / "slope.dcm"), "status"] == "error"
    assert "(0028,1053) Rescale Slope" in reasons["slope.dcm"] and "dcmodify" in reasons[
        "slope.dcm"]
    for name in ("vr.dcm", "ds.dcm", "nosop.dcm"):
        out = pydicom.dcmread(tmp_path / "out" / name)
        assert "source header repaired: (00" in out.DerivationDescription
        np.testing.assert_array_equal(out.pixel_array, _pixels(ins / name))


def test_repaired_outputs_add_no_dciodvfy_error(tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) not installed; .ci/run installs it")
    ins = _damaged_folder(tmp_path)
    apply_translator(load_translator("identity"), ins, tmp_path / "out", progress=False)

    def errors(path) -> set[str]:
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        return {line for line in (run.stdout + run.stderr).splitlines()
                if line.startswith("Error")}

    for name in ("vr.dcm", "ds.dcm", "nosop.dcm"):
        assert not errors(tmp_path / "out" / name), name
        assert errors(ins / name), name  # the validator does see the damage in the input
