"""DICOM reading and writing with pydicom.

Reading applies the modality transform users expect (rescale slope/intercept, then
MONOCHROME1 inverted so that higher always means brighter/denser). Writing undoes both,
stores uncompressed little-endian pixels (never a second lossy compression), keeps
every tag, and gives the derived image new SOP and series instance UIDs plus a
derivation note, as DICOM asks of derived images.
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_description, dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

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
    repairs = repair_header(path, ds)  # before any element is used
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
    repairs += repair_identity(path, ds)

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
        repairs=repairs,
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


# --- damaged header elements -----------------------------------------------------------
# Archives hold files whose pixels are fine but whose header has one damaged element (an
# unknown VR, a number with a stray byte, no SOP Instance UID). They are written: what can
# be kept is kept, the rest is trimmed, emptied or dropped, and each change is noted.

PIXEL_DATA = Tag("PixelData")
# What the reader needs to decode the pixels, or image IODs require (Type 1): damaged
# beyond repair, the file is refused naming the element, never written invalid.
ESSENTIAL = frozenset(Tag(k) for k in (
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "RescaleSlope",
    "RescaleIntercept", "PixelSpacing", "ImagerPixelSpacing", "SOPClassUID",
    "StudyInstanceUID", "Modality"))
# a number string with bytes that are not printable ASCII (a NUL, a control byte) around it
_NUMBER = {
    "DS": re.compile(r"[^\x21-\x7e]*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[^\x21-\x7e]*"),
    "IS": re.compile(r"[^\x21-\x7e]*([+-]?\d+)[^\x21-\x7e]*"),
}
_BINARY_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "AT": 4, "UV": 8,
                "SV": 8}


def repair_header(path: Path, ds: pydicom.Dataset) -> list[str]:
    """Make a header with damaged elements readable and writable, and return one note per
    change; an ESSENTIAL element damaged beyond repair raises ImageReadError naming it and
    the fix."""
    notes: list[str] = []
    _repair_elements(path, ds, notes, top=True)
    _repair_transfer_syntax(ds, notes)
    return notes


def _repair_elements(path: Path, ds: pydicom.Dataset, notes: list[str], top: bool) -> None:
    for tag in list(ds.keys()):
        if tag == PIXEL_DATA:
            continue  # decoded, and refused when broken, by _decode_pixels
        try:
            elem = ds[tag]
        except Exception as err:  # noqa: BLE001 - pydicom raises many types for one element
            _repair_undecodable(path, ds, tag, err, notes, top)
            continue
        if elem.VR == "SQ":
            for item in elem.value:
                _repair_elements(path, item, notes, top=False)
        elif elem.VR in _NUMBER:
            _repair_number_string(path, elem, notes, top)


def _repair_undecodable(path: Path, ds: pydicom.Dataset, tag: BaseTag, err: Exception,
                        notes: list[str], top: bool) -> None:
    """An element pydicom cannot decode (e.g. an unknown VR): read with the VR the DICOM
    dictionary gives its tag when its bytes fit that VR, else emptied (public) or dropped
    (private, whose VR nobody knows)."""
    raw = ds.get_item(tag)
    vr = _dictionary_vr(tag, ds)
    if vr is not None and raw.length % _BINARY_SIZE.get(vr, 1) == 0:
        try:
            ds[tag] = raw._replace(VR=vr)
            elem = ds[tag]
        except Exception:  # noqa: BLE001 - the bytes do not fit the dictionary VR either
            ds[tag] = raw  # as it was, to be emptied or dropped below
        else:
            notes.append(f"{_name(tag)}: unknown VR {raw.VR!r} read as its dictionary VR {vr}")
            if elem.VR in _NUMBER:
                _repair_number_string(path, elem, notes, top)
            return
    reason = str(err).splitlines()[-1].strip()[:120]
    _refuse_if_essential(path, tag, top, f"cannot be decoded ({reason})")
    if vr is None:
        del ds[tag]
        notes.append(f"{_name(tag)}: dropped, it cannot be decoded ({reason})")
    else:
        ds[tag] = DataElement(tag, vr, None)
        notes.append(f"{_name(tag)}: emptied, it cannot be decoded ({reason})")


def _repair_number_string(path: Path, elem: DataElement, notes: list[str], top: bool) -> None:
    """A decimal or integer string (DS, IS) that does not parse: stray bytes around the
    number (a NUL, a control byte) are trimmed; anything else empties the element."""
    values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
    if not any(isinstance(v, str) and v.strip() for v in values):
        return  # pydicom parsed them all (numbers), or the element is empty
    fixed = [_trimmed(elem.VR, v) for v in values]
    if None in fixed:
        shown = "\\".join(str(v) for v in values)
        _refuse_if_essential(path, elem.tag, top, f"holds {shown!r}, not a valid {elem.VR}")
        elem.value = None
        notes.append(f"{_name(elem.tag)}: emptied, {shown!r} is not a valid {elem.VR}")
        return
    changed = [f"{v!r} -> {f!r}" for v, f in zip(values, fixed, strict=True) if v != f]
    if changed:
        elem.value = fixed if len(fixed) > 1 else fixed[0]
        notes.append(f"{_name(elem.tag)}: stray bytes trimmed ({', '.join(changed)})")


def _trimmed(vr: str, value: object) -> object:
    """`value` without the junk around its number; None when it holds no clean number."""
    if not isinstance(value, str) or not value.strip():
        return value  # a parsed number, or an empty value
    match = _NUMBER[vr].fullmatch(value)
    return match.group(1) if match else None


def repair_identity(path: Path, ds: pydicom.Dataset) -> list[str]:
    """A missing SOP Class UID is taken from the file meta (else the file is refused); a
    missing SOP Instance UID is made. Checked once the pixels are known to decode, whose
    problems come first."""
    notes = []
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if not ds.get("SOPClassUID"):
        if not meta.get("MediaStorageSOPClassUID"):
            raise ImageReadError(path, "no SOP Class UID (0008,0016): the kind of image is "
                                 "unknown", 'add it, e.g. dcmodify -i "(0008,0016)='
                                 '1.2.840.10008.5.1.4.1.1.7" (Secondary Capture), or '
                                 "re-export the file")
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        notes.append("(0008,0016) SOP Class UID: missing, taken from the file meta")
    if not ds.get("SOPInstanceUID"):
        # the output's new UID is derived from this one: when the file meta has none
        # either, make it from the pixels, so a rerun gives the same output UID
        ds.SOPInstanceUID = meta.get("MediaStorageSOPInstanceUID") or derived_uid(
            hashlib.sha256(bytes(ds.PixelData)).hexdigest(), "missing sop")
        notes.append("(0008,0018) SOP Instance UID: missing, the output has a new one")
    return notes


def _repair_transfer_syntax(ds: pydicom.Dataset, notes: list[str]) -> None:
    """A file meta without Transfer Syntax UID, over uncompressed pixels: the syntax is the
    encoding pydicom found the data set in."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    encapsulated = bytes(ds.PixelData[:4]) == b"\xfe\xff\x00\xe0"  # an item tag: compressed
    if "TransferSyntaxUID" not in meta and not encapsulated:
        implicit, little = ds.original_encoding
        syntax = (ImplicitVRLittleEndian if implicit else
                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta = meta
        meta.TransferSyntaxUID = syntax
        notes.append(f"(0002,0010) Transfer Syntax UID: missing, set to {syntax.name}")


def _dictionary_vr(tag: BaseTag, ds: pydicom.Dataset) -> str | None:
    """The VR the DICOM dictionary gives a public tag; one choice for ambiguous ones."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    if vr.startswith("US or SS"):  # signedness follows the pixels
        return "SS" if ds.get("PixelRepresentation", 0) == 1 else "US"
    return vr.split(" or ")[0]


def _refuse_if_essential(path: Path, tag: BaseTag, top: bool, problem: str) -> None:
    if top and tag in ESSENTIAL:
        raise ImageReadError(path, f"{_name(tag)} {problem}",
                             f'set a valid value, e.g. dcmodify -m "{tag}=<value>" '
                             f"{path.name}, or re-export the file from the PACS")


def _name(tag: BaseTag) -> str:
    try:
        return f"{tag} {dictionary_description(tag)}"
    except KeyError:
        return f"{tag} (private)" if tag.is_private else str(tag)


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
    if template.repairs:  # what the reader changed in the source's header, said once here
        step += "; source header repaired: " + "; ".join(template.repairs)
    before = str(ds.get("DerivationDescription", "") or "").strip()
    ds.DerivationDescription = (f"{before}; {step}" if before else step)[-1024:]
    if "SeriesDescription" in ds:
        ds.SeriesDescription = _with_suffix(str(ds.SeriesDescription), " harmonized", 64)
    ds.save_as(out, enforce_file_format=True)
