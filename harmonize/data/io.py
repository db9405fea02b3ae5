"""Read and write 2D medical images, keeping what a writer needs to give the file back.

`read_image` returns a `MedicalImage`: the pixel values as the modality defines them
(DICOM: rescale slope/intercept applied, MONOCHROME1 inverted to MONOCHROME2), the
range those values can take, and a format header. `write_image` takes such an image
as a template and a new array of values and writes a file of the same format, dtype,
size and spacing (DICOM: same tags, new instance UIDs). Writes are atomic: a temporary
file in the target folder is renamed into place, so an interrupted job never leaves a
half-written output behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from harmonize.data.image import ImageReadError, ImageWriteError, MedicalImage, cast_to_storage

__all__ = ["ImageReadError", "ImageWriteError", "MedicalImage", "cast_to_storage",
           "read_image", "write_image", "atomic_write", "image_format", "is_image_file"]

# suffix -> format name; checked longest first so ".nii.gz" wins over ".gz"
ITK_FORMATS = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".mha": "mha",
    ".mhd": "mha",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
}
DICOM_SUFFIXES = (".dcm", ".dicom")
_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: mkstemp makes 0600 files, outputs get the usual mode
SUPPORTED = "PNG, JPEG, TIFF, DICOM, NIfTI, MHA/MHD, NRRD"


def image_format(path: str | os.PathLike) -> str | None:
    """The format a path's name announces, 'dicom' for DICOM magic, or None if unknown."""
    name = Path(path).name.lower()
    for suffix in sorted(ITK_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return ITK_FORMATS[suffix]
    if name.endswith(DICOM_SUFFIXES) or has_dicom_magic(path):
        return "dicom"
    return None


def is_image_file(path: str | os.PathLike) -> bool:
    return image_format(path) is not None


def has_dicom_magic(path: str | os.PathLike) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str | os.PathLike) -> MedicalImage:
    """Read one 2D grayscale image of any supported format, or raise ImageReadError."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found", "check the path")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "file is empty", "re-export or remove it")
    fmt = image_format(path)
    if fmt is None:
        raise ImageReadError(
            path,
            f"not a supported image (suffix '{path.suffix or 'none'}')",
            f"supported: {SUPPORTED}",
        )
    if fmt == "dicom":
        from harmonize.data import dicom

        image = dicom.read_dicom(path)
    else:
        image = _read_itk(path, fmt)
    _check_values(path, image.array)
    return image


EXACT_IN_FLOAT32 = 2**24  # integers beyond this cannot all be held by float32 model space


def _check_values(path: Path, arr: np.ndarray) -> None:
    """Values the model space cannot carry: refused with the reason, never written wrong."""
    if arr.dtype.kind == "f":
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            raise ImageReadError(path, f"{bad} pixel(s) are NaN or infinite",
                                 "replace them with finite values first")
    elif arr.dtype.itemsize >= 4 and int(np.abs(arr).max(initial=0)) >= EXACT_IN_FLOAT32:
        raise ImageReadError(path, f"integer values up to {int(np.abs(arr).max()):,}: beyond "
                             f"{EXACT_IN_FLOAT32:,} float32 model space cannot hold them "
                             "exactly", "rescale the image to 16 bits first")


def write_image(
    template: MedicalImage,
    array: np.ndarray,
    out_path: str | os.PathLike,
    derivation: str = "harmonized by harmonize",
) -> Path:
    """Write `array` (modality values, same shape as the template) like the template file."""
    out_path = Path(out_path)
    if array.shape != template.array.shape:
        raise ImageWriteError(
            f"{out_path}: array shape {array.shape} differs from the input's "
            f"{template.array.shape}; a writer keeps the input's size"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        if template.format == "dicom":
            from harmonize.data import dicom

            dicom.write_dicom(template, array, tmp, derivation)
        else:
            _write_itk(template, array, tmp)

    try:
        return atomic_write(out_path, write)
    except Exception as err:  # noqa: BLE001 - said once, naming the output, not the temp file
        raise _write_failure(out_path, template.format, err) from None


def _write_failure(out_path: Path, fmt: str, err: Exception) -> ImageWriteError:
    space = "check the free disk space and the folder's permissions"
    if isinstance(err, OSError) and err.strerror:
        return ImageWriteError(f"{out_path}: not written: {err.strerror} ({space})")
    if fmt == "dicom":  # pydicom names the element first, then adds a traceback
        detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
        fix = "correct the element it names in the source file, e.g. with dcmodify"
    else:  # ITK puts the description last; what fails there is mostly the disk
        detail, fix = _first_line(err), space
    return ImageWriteError(f"{out_path}: not written as {fmt.upper()}: {detail} ({fix})")


def atomic_write(out_path: Path, write) -> Path:
    """Call write(tmp_path) for a temp file beside out_path, then rename it into place."""
    suffix = "".join(out_path.suffixes[-2:]) if out_path.name.endswith(".gz") else out_path.suffix
    suffix = suffix.lower()  # writers pick the format by suffix and know only lower case
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.stem}.", suffix=f".partial{suffix}",
                               dir=out_path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


# --- formats read through SimpleITK --------------------------------------------------


MAX_PIXELS = int(os.environ.get("HARMONIZE_MAX_PIXELS", 2**28))  # 16384 x 16384


def _check_header(path: Path, fmt: str) -> None:
    """Refuse, from the header alone, what would exhaust memory or is cut short: one
    small hostile file must not end a whole batch (a 15 KB NIfTI can claim 32767 x 32767
    float32 pixels, 4 GB)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        if "Unknown PixelType" in str(err):  # ITK's words for e.g. grey + alpha PNGs
            raise ImageReadError(path, "a pixel layout harmonize cannot read (e.g. grey "
                                 "+ alpha)", "export it as plain grayscale") from None
        raise ImageReadError(path, f"cannot decode as {fmt.upper()}: {_first_line(err)}",
                             "the file is corrupt or truncated; re-export it") from None
    size = reader.GetSize()
    pixels = int(np.prod(size, dtype=np.int64))
    if pixels > MAX_PIXELS:
        raise ImageReadError(path, f"its header claims {' x '.join(map(str, size))} pixels, "
                             f"more than the limit of {MAX_PIXELS:,}",
                             "if the image is real, raise HARMONIZE_MAX_PIXELS")


NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2",
                768: "u4", 1024: "i8", 1280: "u8"}


def _check_nifti_data(path: Path) -> None:
    """Check a NIfTI-1 file's raw data (after `_check_header` bounded its size): refuse it
    when the data stop short (ITK fills a truncated .nii.gz silently) or hold NaN/Inf
    (ITK turns them into 0). Only float or compressed data are read for this; an
    uncompressed integer file is checked by its size."""
    import gzip
    import struct

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            header = fh.read(348)
            if len(header) < 348:
                return  # no header: ITK's reader says what is wrong
            endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            dims = struct.unpack(f"{endian}8h", header[40:56])
            dtype = NIFTI_DTYPES.get(struct.unpack(f"{endian}h", header[70:72])[0])
            offset = int(struct.unpack(f"{endian}f", header[108:112])[0])
            if dtype is None or not 1 <= dims[0] <= 7:
                return  # a type or layout we do not parse: ITK's reader decides
            count = int(np.prod([max(d, 1) for d in dims[1:dims[0] + 1]], dtype=np.int64))
            needed = count * int(dtype[1])
            if opener is open and dtype[0] != "f":  # integers, uncompressed: the size tells
                if path.stat().st_size < max(offset, 348) + needed:
                    raise ImageReadError(path, f"truncated: the header announces {count:,} "
                                         "pixels, the file holds fewer",
                                         "re-export or copy it again")
                return
            fh.read(max(offset, 348) - 348)
            raw = fh.read(needed)
    except (EOFError, OSError):
        raw = b""  # the compressed stream ends early
        count, dtype, endian = 1, "u1", "<"
    if len(raw) < count * int(dtype[1]):
        raise ImageReadError(path, f"truncated: the header announces {count:,} pixels, the "
                             "file holds fewer", "re-export or copy it again")
    if dtype[0] == "f":
        bad = int((~np.isfinite(np.frombuffer(raw, dtype=endian + dtype))).sum())
        if bad:
            raise ImageReadError(path, f"{bad} pixel(s) are NaN or infinite",
                                 "replace them with finite values first")


def _check_tiff_samples(path: Path) -> None:
    """ITK reads a multi-sample TIFF it has no reader for (e.g. planar 16-bit RGB) through
    an 8-bit RGBA fallback, losing bits: refuse what is not one grey channel (or equal
    RGB, which `_collapse_gray` checks) before that."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            samples, planar = int(page.samplesperpixel), int(page.planarconfig)
    except Exception:  # noqa: BLE001 - not parseable here: ITK's reader says why
        return
    if samples > 1 and (planar == 2 or samples not in (3,)):
        raise ImageReadError(path, f"a TIFF of {samples} samples per pixel"
                             + (" stored plane by plane" if planar == 2 else ""),
                             "harmonize takes single-channel grayscale images; export one "
                             "channel")


def _check_jpeg_end(path: Path) -> None:
    """A JPEG ends with its EOI marker; libjpeg only warns on stderr ("Premature end of
    JPEG file") and returns the image padded with grey."""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 1024))
        tail = fh.read()
    if b"\xff\xd9" not in tail:
        raise ImageReadError(path, "truncated JPEG (no end-of-image marker)",
                             "re-export or copy it again")


# libjpeg's warnings: the data are damaged and the decoder guessed (grey fill, shifted
# blocks); another decoder guesses otherwise, by up to 255 grey levels
JPEG_WARNING = re.compile(r"Corrupt JPEG data|Premature end of JPEG file|Invalid SOS "
                          r"parameters|Inconsistent progression sequence|bad (Huffman|"
                          r"arithmetic) code")
_OUTPUT_LOCK = threading.Lock()  # file descriptors 1 and 2 are one per process


def _read_jpeg(path: Path) -> sitk.Image:
    """ITK's libjpeg reports damaged entropy-coded data only as a warning printed on the
    process's stdout, and returns an image anyway: capture the output streams while it
    decodes and refuse the file on a warning, as a truncated one is. What other threads
    print meanwhile is passed on."""
    with _OUTPUT_LOCK:
        sys.stdout.flush()
        sys.stderr.flush()
        with _captured(1) as out, _captured(2) as err:
            img = sitk.ReadImage(str(path))
    warnings = [ln.strip() for ln in out + err if JPEG_WARNING.search(ln)]
    for fd, lines in ((1, out), (2, err)):
        others = "".join(ln for ln in lines if not JPEG_WARNING.search(ln))
        if others:
            os.write(fd, others.encode())
    if warnings:
        raise ImageReadError(path, f"damaged JPEG data (the decoder says: {warnings[0]})",
                             "its pixels would be guessed; re-export or copy it again")
    return img


@contextlib.contextmanager
def _captured(fd: int) -> Iterator[list[str]]:
    """The lines written to file descriptor `fd` (C code included) inside the block."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(fd)
        os.dup2(capture.fileno(), fd)
        try:
            yield lines
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            lines += capture.read().decode(errors="replace").splitlines(keepends=True)


def _read_itk(path: Path, fmt: str) -> MedicalImage:
    _check_header(path, fmt)
    if fmt == "nifti":
        _check_nifti_data(path)
    elif fmt == "jpeg":
        _check_jpeg_end(path)
    elif fmt == "tiff":
        _check_tiff_samples(path)
    try:
        img = _read_jpeg(path) if fmt == "jpeg" else sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = _first_line(err)
        raise ImageReadError(path, f"cannot decode as {fmt.upper()}: {reason}",
                             "the file is corrupt or truncated; re-export it") from None
    size = img.GetSize()
    components = img.GetNumberOfComponentsPerPixel()
    arr = sitk.GetArrayFromImage(img)
    squeezed_3d = False
    if img.GetDimension() == 3:
        if size[2] != 1:
            raise ImageReadError(path, f"a 3D volume of {size[2]} slices, not a 2D image",
                                 "extract the slice or projection to harmonize")
        arr = arr[0]
        squeezed_3d = True
    elif img.GetDimension() != 2:
        raise ImageReadError(path, f"{img.GetDimension()}D image", "harmonize takes 2D images")
    if components in (2, 4):
        raise ImageReadError(path, f"an image with an alpha (transparency) channel "
                             f"({components} channels)", "harmonize takes grayscale images; "
                             "export it without alpha")
    if components > 1:
        arr = _collapse_gray(path, arr, components)
    if arr.size == 0:
        raise ImageReadError(path, "image has no pixels", "re-export it")
    bits, value_range = _integer_range(arr)
    metadata, repairs = _text_metadata(img)
    return MedicalImage(
        array=arr,
        path=path,
        format=fmt,
        value_range=value_range,
        bits_stored=bits,
        spacing=tuple(float(s) for s in img.GetSpacing()[:2][::-1]),
        header={
            "components": components,
            "squeezed_3d": squeezed_3d,
            "spacing": img.GetSpacing(),
            "origin": img.GetOrigin(),
            "direction": img.GetDirection(),
            "metadata": metadata,
        },
        repairs=repairs,
    )


def _text_metadata(img: sitk.Image) -> tuple[dict[str, str], list[str]]:
    """The header's entries, to write back; one whose key or value is not text (a damaged
    MHA/NRRD header) can be neither returned nor written by ITK: dropped, with a note."""
    kept, repairs = {}, []
    for key in img.GetMetaDataKeys():
        try:
            value = img.GetMetaData(key)
            key.encode(), value.encode()  # surrogates (undecodable bytes) raise here
        except (TypeError, UnicodeError):
            shown = repr(key.encode(errors="surrogateescape"))[1:]
            repairs.append(f"header entry {shown}: dropped, it is not text")
            continue
        kept[key] = value
    return kept, repairs


def _collapse_gray(path: Path, arr: np.ndarray, components: int) -> np.ndarray:
    """RGB(A) files with equal colour channels are common exports of grayscale X-rays."""
    colour = arr[..., :3] if components >= 3 else arr[..., :1]
    if not (colour == colour[..., :1]).all():
        raise ImageReadError(path, f"a colour image ({components} channels differ)",
                             "harmonize takes grayscale images; convert it first")
    return np.ascontiguousarray(colour[..., 0])


def _integer_range(arr: np.ndarray) -> tuple[int | None, tuple[float, float]]:
    """Storage range of a non-DICOM array: 8-bit full range; for 16-bit containers the
    smallest of 10/12/14/16 bits that holds the data (a 12-bit detector saved as 16-bit
    PNG stays 12-bit data); floats: the data's own range."""
    if arr.dtype.kind == "f":
        return None, (float(arr.min()), float(arr.max()))
    info = np.iinfo(arr.dtype)
    if arr.dtype.kind == "u" and info.bits == 16:
        top = int(arr.max())
        bits = next(b for b in (10, 12, 14, 16) if top <= 2**b - 1)
        return bits, (0.0, float(2**bits - 1))
    return info.bits, (float(info.min), float(info.max))


def _write_itk(template: MedicalImage, array: np.ndarray, tmp: Path) -> None:
    dtype = template.array.dtype
    if dtype.kind == "f":
        values = np.asarray(array, dtype=dtype)
    else:
        info = np.iinfo(dtype)  # the container can hold more than the image's own range
        values = cast_to_storage(array, dtype, (info.min, info.max))
    h = template.header
    if h.get("components", 1) > 1:
        values = np.repeat(values[..., None], h["components"], axis=-1)
    if h.get("squeezed_3d"):
        values = values[None]
    img = sitk.GetImageFromArray(values, isVector=h.get("components", 1) > 1)
    img.SetSpacing(h["spacing"])
    img.SetOrigin(h["origin"])
    img.SetDirection(h["direction"])
    for key, value in h.get("metadata", {}).items():
        if not key.startswith("ITK_"):
            img.SetMetaData(key, value)
    if template.format == "jpeg":  # JPEG has no lossless mode here: the best quality
        sitk.WriteImage(img, str(tmp), useCompression=True, compressionLevel=100)
    else:
        sitk.WriteImage(img, str(tmp), useCompression=template.format in ("nifti", "mha", "nrrd"))


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # ITK messages end with the useful description after the file/line prefix
    msg = lines[-1] if lines else type(err).__name__
    return msg[:200]
