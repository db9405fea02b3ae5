"""Seeded folders of mixed good and malformed image files, for checking that batch work
never writes a wrong output: every valid file must come out (identity: exactly, JPEG
within its lossy re-encoding) and every malformed one must be an error, never `ok`.
Valid files include float images and files with one damaged header element that the
reader repairs (DICOM: an unknown VR, a number with a stray byte, no SOP Instance UID;
MHA: a header key that is not text); malformed ones include JPEGs whose entropy-coded
data are damaged but still decode, and a DICOM whose Rescale Slope is no number.

Used by tests/test_hostile_inputs.py (300 files) and eval/hostile_inputs.py (1,000+).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from harmonize.synth.phantom import make_phantom

VALID = ("png8", "png16", "tif16", "jpg", "nii", "niigz", "mha", "dcm", "tif32", "nii32",
         "dcm_damaged", "mha_damaged")
MALFORMED = ("truncated", "random", "empty", "volume3d", "colour", "nan", "huge_header",
             "alpha", "jpg_damaged", "dcm_bad_slope")
SUFFIX = {"png8": ".png", "png16": ".png", "tif16": ".tif", "jpg": ".jpg", "nii": ".nii",
          "niigz": ".nii.gz", "mha": ".mha", "dcm": ".dcm", "tif32": ".tif",
          "nii32": ".nii", "dcm_damaged": ".dcm", "mha_damaged": ".mha"}
DICOM_DAMAGE = ("unknown_vr", "stray_byte", "no_sop_uid")


def _image(rng: np.random.Generator, side: int) -> np.ndarray:
    x = make_phantom("xray", side, bool(rng.integers(2)), rng).ideal
    return ((x - x.min()) / (x.max() - x.min() + 1e-12)).astype(np.float32)


def _write_valid(kind: str, path: Path, x: np.ndarray, damage: str = "") -> None:
    if kind == "png8" or kind == "jpg":
        arr = np.rint(x * 255).astype(np.uint8)
    elif kind in ("png16", "tif16", "mha", "mha_damaged"):
        arr = np.rint(x * 4095).astype(np.uint16)
    elif kind in ("nii", "niigz"):
        arr = np.rint(x * 2000 - 1000).astype(np.int16)
    elif kind in ("tif32", "nii32"):  # arbitrary floats: the identity must keep every bit
        arr = (x * 1234.567 - 321.5).astype(np.float32)
    else:  # dcm, dcm_damaged
        _write_dicom(path, np.rint(x * 4095).astype(np.uint16), damage)
        return
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    if kind == "mha_damaged":  # a header key holding a byte that is not text
        data = path.read_bytes()
        path.write_bytes(data.replace(b"ElementType", b"Stati\xf3n = 3\nElementType", 1))


def _write_dicom(path: Path, arr: np.ndarray, damage: str = "") -> None:
    """A 12-bit CT-like DICOM; `damage`: one of DICOM_DAMAGE, or "bad_slope" (a Rescale
    Slope that is no number), written raw as a damaged archive holds it."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    def raw(tag: int, vr: str, value: bytes) -> RawDataElement:
        return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = arr.astype("<u2").tobytes()
    if damage == "unknown_vr":  # Acquisition Matrix (US) with the VR bytes 0x55 0x13
        ds[0x00181310] = raw(0x00181310, "U\x13", b"\x00\x00\x30\x00\x30\x00\x00\x00")
    elif damage == "stray_byte":  # Pixel Spacing with a control byte after a number
        ds[0x00280030] = raw(0x00280030, "DS", b"0.66146\x18\\0.66146 ")
    elif damage == "no_sop_uid":
        del ds.SOPInstanceUID
    elif damage == "bad_slope":
        ds[0x00281053] = raw(0x00281053, "DS", b"1.x ")
    ds.save_as(path, enforce_file_format=damage != "no_sop_uid")


def _damage_jpeg(path: Path, rng: np.random.Generator) -> None:
    """Entropy-coded data that libjpeg still decodes, with a warning: cut in the middle
    (the rest of the image is guessed) or followed by junk before the end marker."""
    data = path.read_bytes()
    scan = data.index(b"\xff\xda")
    if rng.integers(2):
        path.write_bytes(data[: scan + (len(data) - scan) // 2] + b"\xff\xd9")
    else:
        path.write_bytes(data[:-2] + bytes(int(rng.integers(8, 200))) + b"\xff\xd9")


def _nifti_header_claiming(width: int, height: int) -> bytes:
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 2, width, height, 1, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 16, 32)
    struct.pack_into("<8f", hdr, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", hdr, 108, 352)
    hdr[344:348] = b"n+1\0"
    return bytes(hdr) + b"\0" * 4


def write_hostile_files(out: str | Path, n: int = 300, seed: int = 0,
                        side: int = 48) -> pd.DataFrame:
    """n files under OUT/files/<site>/ (two sites; one file in three malformed), and the
    table of what each is: columns name, site, kind, expected ('ok' or 'error')."""
    root = Path(out) / "files"
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        site = f"site_{'ab'[k % 2]}"
        out = root / site
        out.mkdir(parents=True, exist_ok=True)
        malformed = k % 3 == 2
        valid_index = k - (k + 1) // 3  # valid files before this one (every 3rd is not)
        kind = (MALFORMED[(k // 3) % len(MALFORMED)] if malformed
                else VALID[valid_index % len(VALID)])
        x = _image(rng, side)
        base = VALID[int(rng.integers(len(VALID)))]
        if kind == "dcm_damaged":
            damage = DICOM_DAMAGE[(valid_index // len(VALID)) % len(DICOM_DAMAGE)]
            name = f"{k:04d}_{kind}_{damage}.dcm"
            _write_valid(kind, out / name, x, damage)
        elif kind in VALID:
            name = f"{k:04d}_{kind}{SUFFIX[kind]}"
            _write_valid(kind, out / name, x)
        elif kind == "jpg_damaged":
            name = f"{k:04d}_{kind}.jpg"
            _write_valid("jpg", out / name, x)
            _damage_jpeg(out / name, rng)
        elif kind == "dcm_bad_slope":
            name = f"{k:04d}_{kind}.dcm"
            _write_dicom(out / name, np.rint(x * 4095).astype(np.uint16), "bad_slope")
        elif kind == "truncated":
            base = ("png8", "png16", "jpg", "nii", "niigz", "dcm")[int(rng.integers(6))]
            name = f"{k:04d}_{kind}_{base}{SUFFIX[base]}"
            _write_valid(base, out / name, x)
            data = (out / name).read_bytes()
            (out / name).write_bytes(data[: len(data) // 2])
        elif kind == "random":
            name = f"{k:04d}_{kind}{SUFFIX[base]}"
            (out / name).write_bytes(rng.bytes(int(rng.integers(10, 5000))))
        elif kind == "empty":
            name = f"{k:04d}_{kind}{SUFFIX[base]}"
            (out / name).write_bytes(b"")
        elif kind == "volume3d":
            name = f"{k:04d}_{kind}.nii"
            vol = np.stack([x, x, x]).astype(np.float32)
            sitk.WriteImage(sitk.GetImageFromArray(vol), str(out / name))
        elif kind == "colour":
            name = f"{k:04d}_{kind}.png"
            rgb = np.stack([x, x * 0.5, 1 - x], axis=-1)
            sitk.WriteImage(sitk.GetImageFromArray(np.rint(rgb * 255).astype(np.uint8),
                                                   isVector=True), str(out / name))
        elif kind == "nan":
            name = f"{k:04d}_{kind}.mha"
            y = x.copy()
            y[int(rng.integers(side)), int(rng.integers(side))] = np.nan
            sitk.WriteImage(sitk.GetImageFromArray(y), str(out / name))
        elif kind == "huge_header":
            name = f"{k:04d}_{kind}.nii"
            (out / name).write_bytes(_nifti_header_claiming(32767, 32767) + b"\0" * 1024)
        else:  # alpha
            name = f"{k:04d}_{kind}.png"
            rgba = np.stack([x, x, x, np.ones_like(x)], axis=-1)
            sitk.WriteImage(sitk.GetImageFromArray(np.rint(rgba * 255).astype(np.uint8),
                                                   isVector=True), str(out / name))
        rows.append({"name": name, "site": site, "kind": kind,
                     "expected": "error" if malformed else "ok"})
    table = pd.DataFrame(rows)
    table.to_csv(root.parent / "expected.csv", index=False)
    return table
