"""Reading and writing every supported format; DICOM modality handling."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import tifffile
from pydicom.uid import ExplicitVRLittleEndian

from conftest import dicom_file
from harmonize.data.intensity import IntensityPolicy
from harmonize.data.io import ImageReadError, read_image, write_image


def test_bone_scan_dicom_decodes_as_12_bit_nm():
    img = read_image(dicom_file("JPGExtended.dcm"))
    assert img.format == "dicom" and img.modality == "NM"
    assert img.shape == (1024, 256) and img.array.dtype == np.uint16
    assert img.bits_stored == 12 and img.value_range == (0.0, 4095.0)
    assert 200 < img.array.max() < 4096


def test_broken_jpeg_scan_header_is_repaired():
    """JPEG-lossy.dcm has Se=0 in its scan header; strict decoders refuse it. Repaired,
    it must decode to exactly the pixels of pydicom's fixed copy JPGExtended.dcm."""
    broken = read_image(dicom_file("JPEG-lossy.dcm")).array
    fixed = read_image(dicom_file("JPGExtended.dcm")).array
    np.testing.assert_array_equal(broken, fixed)


def test_dicom_write_keeps_tags_and_gives_new_deterministic_uids(tmp_path):
    src = dicom_file("JPGExtended.dcm")
    img = read_image(src)
    write_image(img, img.array, tmp_path / "a.dcm", derivation="test")
    write_image(img, img.array, tmp_path / "b.dcm", derivation="test")
    orig, a, b = (pydicom.dcmread(p) for p in (src, tmp_path / "a.dcm", tmp_path / "b.dcm"))
    np.testing.assert_array_equal(a.pixel_array, orig.pixel_array)
    for tag in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate", "Modality"):
        assert a.get(tag) == orig.get(tag), tag
    assert a.SOPInstanceUID != orig.SOPInstanceUID
    assert a.SeriesInstanceUID != orig.SeriesInstanceUID
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert a.ImageType[0] == "DERIVED" and "test" in a.DerivationDescription
    assert a.LossyImageCompression == "01"  # the source was lossy JPEG


def _uncompressed_copy(tmp_path, **changes):
    ds = pydicom.dcmread(dicom_file("JPGExtended.dcm"))
    pixels = ds.pixel_array
    ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for key, value in changes.items():
        setattr(ds, key, value)
    path = tmp_path / "copy.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, pixels


def test_monochrome1_is_inverted_on_read_and_restored_on_write(tmp_path):
    path, stored = _uncompressed_copy(tmp_path, PhotometricInterpretation="MONOCHROME1")
    img = read_image(path)
    np.testing.assert_array_equal(img.array, 4095 - stored.astype(np.int64))
    out = write_image(img, img.array, tmp_path / "out.dcm")
    back = pydicom.dcmread(out)
    assert back.PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(back.pixel_array, stored)


def test_rescale_slope_intercept_applied_and_undone(tmp_path):
    path, stored = _uncompressed_copy(tmp_path, RescaleSlope="0.5", RescaleIntercept="-100")
    img = read_image(path)
    np.testing.assert_allclose(img.array, stored * 0.5 - 100)
    assert img.value_range == (-100.0, 4095 * 0.5 - 100)
    out = write_image(img, img.array + 10.0, tmp_path / "out.dcm")  # +10 = +20 stored
    np.testing.assert_array_equal(pydicom.dcmread(out).pixel_array,
                                  np.clip(stored.astype(int) + 20, 0, 4095))


def test_multiframe_dicom_is_refused_with_a_clear_message(tmp_path):
    ds = pydicom.dcmread(dicom_file("JPGExtended.dcm"))
    pixels = ds.pixel_array
    ds.PixelData = np.stack([pixels, pixels]).tobytes()
    ds.NumberOfFrames = 2
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "multi.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"multi.dcm.*multi-frame.*2 frames"):
        read_image(tmp_path / "multi.dcm")


@pytest.mark.parametrize("name", ["x16.png", "x12.tif", "vol.nii.gz", "cxr.png"])
def test_roundtrip_keeps_values_dtype_and_spacing(mixed_folder, tmp_path, name):
    src = mixed_folder / name
    if not src.exists():
        pytest.skip("real chest X-ray not available")
    img = read_image(src)
    policy = IntensityPolicy()
    x, params = policy.to_model(img)
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    out = write_image(img, policy.from_model(x, params), tmp_path / name)
    again = read_image(out)
    assert again.array.dtype == img.array.dtype
    np.testing.assert_array_equal(again.array, img.array)
    np.testing.assert_allclose(sitk.ReadImage(str(out)).GetSpacing(),
                               sitk.ReadImage(str(src)).GetSpacing(), rtol=1e-6)


def test_twelve_bit_png_stays_twelve_bit(tmp_path):
    """A 12-bit detector image in a 16-bit PNG is normalized by 4095, and a translator
    output pushed above the top is written back clipped to 12 bits, not 16."""
    arr = np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "a.png"))
    img = read_image(tmp_path / "a.png")
    assert img.bits_stored == 12
    policy = IntensityPolicy()
    x, params = policy.to_model(img)
    assert x.max() == pytest.approx(4000 / 4095)
    values = policy.from_model(x * 1.5, params)
    assert values.dtype == np.uint16 and values.max() == 4095


def test_float_image_roundtrips_within_float32_precision(tmp_path):
    arr = np.random.default_rng(1).normal(100, 30, (32, 32)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "f.nrrd"))
    img = read_image(tmp_path / "f.nrrd")
    policy = IntensityPolicy()
    assert policy.resolved_mode(img) == "percentile"
    x, params = policy.to_model(img)
    np.testing.assert_allclose(policy.from_model(x, params), arr, rtol=1e-5, atol=1e-4)


def test_grey_rgb_png_is_read_as_grey_and_written_back_as_rgb(tmp_path):
    grey = np.random.default_rng(2).integers(0, 255, (20, 30), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", np.repeat(grey[..., None], 3, axis=-1),
                     photometric="rgb")
    img = read_image(tmp_path / "rgb.tif")
    np.testing.assert_array_equal(img.array, grey)
    out = write_image(img, img.array, tmp_path / "out.tif")
    assert sitk.ReadImage(str(out)).GetNumberOfComponentsPerPixel() == 3


def test_colour_image_is_refused(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", rgb, photometric="rgb")
    with pytest.raises(ImageReadError, match="colour.tif.*colour"):
        read_image(tmp_path / "colour.tif")


@pytest.mark.parametrize("content,name,match", [
    (b"", "empty.png", "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "trunc.png", "cannot decode as PNG"),
    (b"hello", "notes.txt", "not a supported image"),
    (b"\x00" * 128 + b"DICM" + b"\x02\x00" * 10, "bad.dcm", "DICOM"),
])
def test_bad_files_raise_an_error_naming_the_file(tmp_path, content, name, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageReadError, match=match) as info:
        read_image(tmp_path / name)
    assert name in str(info.value)


def test_truncated_dicom_names_the_file(tmp_path):
    data = dicom_file("JPGExtended.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.dcm"):
        read_image(tmp_path / "cut.dcm")


def test_extensionless_dicom_is_recognised(tmp_path):
    shutil.copy(dicom_file("JPGExtended.dcm"), tmp_path / "IM0001")
    assert read_image(tmp_path / "IM0001").modality == "NM"
