"""DICOM reading and writing with pydicom.

Reading applies the modality transform users expect (rescale slope/intercept, then
MONOCHROME1 inverted so that higher always means brighter/denser). Writing undoes both,
stores uncompressed little-endian pixels (never a second lossy compression), keeps
every tag, and gives the derived image new SOP and series instance UIDs plus a
derivation note, as DICOM asks of derived images.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from harmonize import __version__
from harmonize.data.image import ImageReadError, MedicalImage, cast_to_storage

# JPEG baseline / extended: sequential DCT, whose scan header must say Ss=0, Se=63
_SEQUENTIAL_JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}
_LOSSY = _SEQUENTIAL_JPEG | {"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.81"}
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as generate_uid uses by default
IMPLEMENTATION_UID = generate_uid(prefix=UID_ROOT, entropy_srcs=["harmonize implementation"])


def read_dicom(path: Path) -> MedicalImage:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise ImageReadError(path, "not a DICOM file (no DICM header)",
                             "check the file or export it as DICOM Part 10") from None
    except Exception as err:  # pydicom raises many types for truncated files
        raise ImageReadError(path, f"corrupt DICOM ({type(err).__name__}: {err})",
                             "re-export the file from the PACS") from None
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM without pixel data (not an image object)",
                             "remove it from the image folder")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames) is not supported",
                             "split it into single-frame files first")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImageReadError(path, "colour DICOM (SamplesPerPixel > 1)",
                             "harmonize takes grayscale images")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(path, f"PhotometricInterpretation {photometric}, not grayscale",
                             "harmonize takes MONOCHROME1/2 images")
    if int(ds.get("BitsAllocated", 16)) == 1:
        raise ImageReadError(path, "1-bit (binary) pixel data, e.g. a segmentation (SEG)",
                             "harmonize takes grayscale images; masks go in the manifest's "
                             "mask column")
    stored = _decode_pixels(path, ds)
    if stored.ndim != 2 or stored.size == 0:
        raise ImageReadError(path, f"pixel data of shape {stored.shape} is not a 2D image")

    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    bits = int(ds.get("BitsStored", stored.dtype.itemsize * 8))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    stored_lo, stored_hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    lo, hi = sorted((stored_lo * slope + intercept, stored_hi * slope + intercept))

    values = stored.astype(np.float64) * slope + intercept
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = lo + hi - values
    integral = float(slope).is_integer() and float(intercept).is_integer()
    wide = max(abs(lo), abs(hi)) > np.iinfo(np.int32).max  # e.g. 32-bit unsigned data
    array = values.astype((np.int64 if wide else np.int32) if integral else np.float64)
    if integral and np.array_equal(stored, array) and stored.dtype.itemsize <= 2:
        array = stored  # keep the natural dtype when no transform changed the values

    del ds.PixelData  # the header is kept for writing; the pixels live in `array`
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return MedicalImage(
        array=array,
        path=path,
        format="dicom",
        value_range=(lo, hi),
        bits_stored=bits,
        spacing=tuple(float(s) for s in spacing) if spacing else None,
        modality=str(ds.get("Modality", "")) or None,
        header={
            "dataset": ds,
            "stored_dtype": stored.dtype,
            "stored_range": (stored_lo, stored_hi),
            "slope": slope,
            "intercept": intercept,
            "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        },
    )


def _decode_pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        return ds.pixel_array
    except Exception as err:
        if str(syntax) in _SEQUENTIAL_JPEG:
            repaired = _repair_sequential_scan(ds)
            if repaired is not None:
                return repaired
        name = getattr(syntax, "name", syntax)
        reason = str(err).splitlines()[-1].strip()[:160]
        compressed = bool(getattr(syntax, "is_compressed", True))
        fix = ("the file is truncated or corrupt; re-export it" if not compressed else
               "the file is corrupt, or its compression needs a decoder not installed "
               "(pylibjpeg-libjpeg / -openjpeg / pyjpegls); re-export it uncompressed")
        raise ImageReadError(path, f"pixel data ({name}) could not be decoded: {reason}",
                             fix) from None


def _repair_sequential_scan(ds: pydicom.Dataset) -> np.ndarray | None:
    """Some old encoders write a wrong spectral range (Se != 63) in the scan header of a
    sequential JPEG, which strict decoders refuse. For sequential modes Ss=0, Se=63 is
    the only legal value, so set it and decode again (pydicom's JPGExtended.dcm is
    JPEG-lossy.dcm repaired exactly this way)."""
    from pydicom.encaps import encapsulate, generate_frames

    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    pos = frame.find(b"\xff\xda")
    if pos < 0:
        return None
    n_components = frame[pos + 4]
    spectral = pos + 5 + 2 * n_components  # after the length and component selectors
    frame[spectral : spectral + 2] = b"\x00\x3f"
    fixed = copy.copy(ds)
    fixed.PixelData = encapsulate([bytes(frame)])
    try:
        return fixed.pixel_array
    except Exception:
        return None


def _with_suffix(text: str, suffix: str, limit: int) -> str:
    """`text` + `suffix` within `limit` characters, `text` shortened at a word boundary."""
    room = limit - len(suffix)
    if len(text) > room:
        cut = text[:room].rsplit(" ", 1)[0] if " " in text[:room] else text[:room]
        text = cut.rstrip()
    return text + suffix


def derived_uid(original: str, purpose: str) -> str:
    """A UID derived deterministically from the original, so a rerun (or --resume) gives
    the same new UIDs and every image of one series lands in one new series."""
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[original, purpose, "harmonize"])


def write_dicom(template: MedicalImage, array: np.ndarray, out: Path, derivation: str) -> None:
    h = template.header
    lo, hi = template.value_range
    values = np.asarray(array, dtype=np.float64)
    if h["dataset"].PhotometricInterpretation == "MONOCHROME1":
        values = lo + hi - values
    stored = (values - h["intercept"]) / h["slope"]
    # written as explicit VR little endian, whatever the source's byte order
    stored = cast_to_storage(stored, np.dtype(h["stored_dtype"]).newbyteorder("<"),
                             h["stored_range"])

    ds = copy.deepcopy(h["dataset"])
    for _ in ds.iterall():  # decode every element, so a big-endian source can be re-encoded
        pass
    ds.set_original_encoding(False, True)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_UID  # who wrote this file
    ds.file_meta.ImplementationVersionName = f"HARMONIZE_{__version__}"[:16]
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OB" if stored.dtype.itemsize == 1 else "OW"
    ds.BitsAllocated = stored.dtype.itemsize * 8
    if h["transfer_syntax"] in _LOSSY:
        ds.LossyImageCompression = "01"  # the source was lossy; the copy inherits that

    ds.SOPInstanceUID = derived_uid(ds.SOPInstanceUID, "sop:" + derivation)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = derived_uid(ds.get("SeriesInstanceUID", ""), "series:" + derivation)
    image_type = list(ds.get("ImageType", ["ORIGINAL", "PRIMARY"]))
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    # history is appended to, never replaced (e.g. "JPEG 2000 irreversible (lossy) 10:1")
    step = f"{derivation} (harmonize {__version__})"
    before = str(ds.get("DerivationDescription", "") or "").strip()
    ds.DerivationDescription = (f"{before}; {step}" if before else step)[-1024:]
    if "SeriesDescription" in ds:
        ds.SeriesDescription = _with_suffix(str(ds.SeriesDescription), " harmonized", 64)
    ds.save_as(out, enforce_file_format=True)
