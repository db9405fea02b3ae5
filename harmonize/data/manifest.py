"""Manifests: the CSV that says which image came from which site, patient and class.

A manifest has the columns ``path, site, label, patient_id`` and optionally ``node``
(federation client, defaults to ``site``), ``split`` (train/val/test) and ``mask`` (ROI
mask). Relative paths are relative to the manifest's folder, so a data folder with its
manifest can be moved or shared as a whole. Any other columns (age, sex, ...) are kept.

`load_manifest` validates everything up front and reports all problems at once, because
a typo found after an hour of training is an hour lost. In memory, ``path`` and ``mask``
hold absolute paths and ``relpath`` holds the path relative to the manifest folder (what
a batch job mirrors into its output tree); `save_manifest` writes relative paths again.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePath

import numpy as np
import pandas as pd

from harmonize.data.io import SUPPORTED, has_dicom_magic, is_image_file

REQUIRED_COLUMNS = ("path", "site", "label", "patient_id")
OPTIONAL_COLUMNS = ("node", "split", "mask")
STANDARD_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
DERIVED_COLUMNS = ("relpath",)  # recomputed on load, never written
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom",
    ".nii", ".nii.gz", ".mha", ".mhd", ".nrrd",
)
# label spellings taken as the negative class; the other of two labels is the positive one
NEGATIVE_LABELS = frozenset(
    {"normal", "negative", "neg", "0", "false", "healthy", "no", "none", "control"}
)
OUTSIDE_PREFIX = "_outside"  # relpath root for images that live outside the manifest folder
MAX_REPORTED = 10
ROW_CONVENTION = "rows are data rows counted from 1 below the header; spreadsheet row = row + 1"


class ManifestError(ValueError):
    """A manifest problem; the message names the file, the row or column, and the fix.

    `problems` holds (row, text) pairs, row being the 1-based data row (header excluded)
    or None for problems with the whole file or a column.
    """

    def __init__(self, manifest: str | os.PathLike, problems: Sequence[tuple[int | None, str]]):
        self.manifest = str(manifest)
        self.problems = list(problems)
        name = self.manifest

        def line(row: int | None, text: str) -> str:
            return f"row {row}: {text}" if row is not None else text

        if len(self.problems) == 1:
            row, text = self.problems[0]
            # one line (the CLI prints one); the spreadsheet row says which convention
            where = f" row {row} (spreadsheet row {row + 1}):" if row is not None else ":"
            msg = f"{name}{where} {text}"
        else:
            shown = self.problems[:MAX_REPORTED]
            head = f"{name}: {len(self.problems)} problems"
            has_rows = any(row is not None for row, _ in shown)
            head += f" ({ROW_CONVENTION}):" if has_rows else ":"
            lines = [head] + [f"  {line(r, t)}" for r, t in shown]
            if len(self.problems) > len(shown):
                lines.append(f"  ... and {len(self.problems) - len(shown)} more")
            msg = "\n".join(lines)
        super().__init__(msg)


# --- loading ------------------------------------------------------------------------


def load_manifest(path: str | os.PathLike, mask_column: str | None = None) -> pd.DataFrame:
    """Read and validate a manifest; raise ManifestError listing every problem found.

    mask_column: use another column (e.g. ``lung_mask``) as the ROI ``mask``; it is
    renamed to ``mask``. Empty mask cells mean "no mask for this image".
    Returns strings throughout (no NaN): absolute ``path``/``mask``, ``node`` filled from
    ``site`` where empty, ``relpath`` (safe to join under an output root, never ``..``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ManifestError(
            path, [(None, f"empty file; expected a header line {','.join(REQUIRED_COLUMNS)}")]
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ManifestError(path, [(None, f"not a readable CSV file: {err}")]) from None
    df.columns = [str(c).strip() for c in df.columns]
    df = _check_columns(df, path, mask_column)
    folder = path.resolve().parent
    for col in [c for c in STANDARD_COLUMNS if c in df.columns]:
        df[col] = df[col].astype(str).str.strip()
    problems = _check_rows(df, folder)
    if problems:
        raise ManifestError(path, problems)
    return _finish(df, folder)


def _check_columns(df: pd.DataFrame, path: Path, mask_column: str | None) -> pd.DataFrame:
    problems: list[tuple[int | None, str]] = []
    columns = list(df.columns)
    # pandas renames a repeated header 'site' to 'site.1'
    dupes = sorted({c.rsplit(".", 1)[0] for c in columns
                    if "." in c and c.rsplit(".", 1)[1].isdigit()
                    and c.rsplit(".", 1)[0] in STANDARD_COLUMNS + (mask_column or "",)})
    if dupes:
        raise ManifestError(path, [(None, f"column(s) {dupes} appear twice; keep one of each")])
    if mask_column is not None and mask_column != "mask":
        if mask_column not in columns:
            problems.append((None, f"mask_column '{mask_column}' is not a column"
                             + _suggest(mask_column, columns) + f"; columns are {columns}"))
        elif "mask" in columns:
            problems.append((None, f"has both a 'mask' column and mask_column '{mask_column}'; "
                             "drop one, or pass mask_column='mask'"))
        else:
            df = df.rename(columns={mask_column: "mask"})
            columns = list(df.columns)
    if len(columns) == 1 and any(sep in columns[0] for sep in (";", "\t", "|")):
        sep = next(sep for sep in (";", "\t", "|") if sep in columns[0])
        raise ManifestError(path, [(None, f"one column '{columns[0][:60]}': the file looks "
                                    f"separated by {sep!r}, not commas; save it as "
                                    "comma-separated CSV")])
    used: set[str] = set()
    for col in REQUIRED_COLUMNS:
        if col in columns:
            continue
        near = _close(col, [c for c in columns if c not in STANDARD_COLUMNS], cutoff=0.6)
        if near:
            used.add(near)
            problems.append((None, f"missing column '{col}' (found '{near}': rename it '{col}')"))
        else:
            problems.append((None, f"missing column '{col}'; required columns are "
                             f"{', '.join(REQUIRED_COLUMNS)}; found {columns}"))
    # an unknown column close to an absent known one is most likely a typo; using the
    # default (e.g. node = site) silently instead would hide the user's intent
    known = STANDARD_COLUMNS + DERIVED_COLUMNS
    absent = [c for c in known if c not in columns]
    for col in columns:
        if col in known or col in used or col == mask_column:
            continue
        near = _close(col, absent)
        if near:
            problems.append((None, f"column '{col}' looks like a misspelling of '{near}'; "
                             f"rename it '{near}' (or rename it clearly if it is something else)"))
    if problems:
        raise ManifestError(path, problems)
    return df.drop(columns=[c for c in DERIVED_COLUMNS if c in df.columns])


def _close(word: str, candidates: Iterable[str], cutoff: float = 0.8) -> str | None:
    """The candidate `word` most likely misspells (case, '_' and '-' ignored), if any."""

    def norm(s: str) -> str:
        return s.lower().replace("-", "_").replace(" ", "_")

    by_norm = {norm(c): c for c in candidates}
    hits = difflib.get_close_matches(norm(word), list(by_norm), n=1, cutoff=cutoff)
    if not hits:  # 'patientid' vs 'patient_id' without the underscore
        squashed = {k.replace("_", ""): v for k, v in by_norm.items()}
        hits2 = difflib.get_close_matches(norm(word).replace("_", ""), list(squashed), n=1,
                                          cutoff=cutoff)
        return squashed[hits2[0]] if hits2 else None
    return by_norm[hits[0]]


def _suggest(word: str, candidates: Iterable[str]) -> str:
    near = _close(word, candidates, cutoff=0.6)
    return f" (did you mean '{near}'?)" if near else ""


def _check_rows(df: pd.DataFrame, folder: Path) -> list[tuple[int | None, str]]:
    problems: list[tuple[int | None, str]] = []
    labels = df["label"]
    partly_unlabelled = bool((labels == "").any() and (labels != "").any())
    has_split = "split" in df.columns
    seen: dict[str, int] = {}
    for i, row in enumerate(df.itertuples(index=False), start=1):
        rec = dict(zip(df.columns, row, strict=True))
        problems += _check_file(rec["path"], folder, "file", i, required=True)
        if rec["path"]:
            key = os.path.normcase(_absolute(rec["path"], folder))
            if key in seen:
                problems.append((i, f"same file as row {seen[key]}; list each image once"))
            else:
                seen[key] = i
        if "mask" in rec and rec["mask"]:
            problems += _check_file(rec["mask"], folder, "mask", i, required=False)
        if not rec["site"]:
            problems.append((i, "empty site; every image needs the site (hospital) it came from"))
        if not rec["patient_id"]:
            problems.append((i, "empty patient_id; splits keep a patient's images together "
                             "(use the image id if each patient has one image)"))
        if partly_unlabelled and not rec["label"]:
            problems.append((i, "empty label; leave labels out only for the whole column "
                             "(unlabelled data), or fill this one in"))
        if has_split and rec["split"] and rec["split"].lower() not in SPLITS:
            problems.append((i, f"split '{rec['split']}' is not one of {', '.join(SPLITS)} "
                             "(or empty)"))
    return problems


def _check_file(value: str, folder: Path, what: str, row: int, required: bool):
    if not value:
        return [(row, f"empty {what} path")] if required else []
    full = _absolute(value, folder)
    if os.path.isfile(full):
        if what == "file" and not (is_image_file(full) or has_dicom_magic(full)):
            return [(row, f"file '{value}' is not an image ({Path(full).suffix or 'no suffix'}"
                     f"; harmonize reads {SUPPORTED})")]
        return []
    where = "" if os.path.isabs(value) else f" (paths are relative to {folder})"
    if os.path.isdir(full):
        return [(row, f"{what} '{value}' is a folder, not a file{where}")]
    return [(row, f"{what} '{value}' not found{where}")]


def _absolute(value: str, folder: Path) -> str:
    # abspath, not resolve(): symlinked data trees keep their own names (relpath mirrors them)
    return os.path.abspath(os.path.join(folder, os.path.expanduser(value)))


def _finish(df: pd.DataFrame, folder: Path) -> pd.DataFrame:
    df = df.copy()
    df["path"] = [_absolute(p, folder) for p in df["path"]]
    df["relpath"] = [safe_relpath(p, folder) for p in df["path"]]
    if "mask" in df.columns:
        df["mask"] = [_absolute(m, folder) if m else "" for m in df["mask"]]
    if "node" in df.columns:
        df["node"] = np.where(df["node"] == "", df["site"], df["node"])
    else:
        df["node"] = df["site"]
    if "split" in df.columns:
        df["split"] = df["split"].str.lower()
    return _order_columns(df.reset_index(drop=True))


def safe_relpath(path: str | os.PathLike, folder: str | os.PathLike) -> str:
    """`path` relative to `folder` in POSIX form, safe to join under an output root.

    Paths outside `folder` (which would start with '..') become
    ``_outside/<absolute path without its root>`` so a mirrored tree never escapes.
    """
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    try:
        rel = os.path.relpath(path, folder)
    except ValueError:  # another drive on Windows
        rel = os.pardir
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        anchorless = PurePath(path).relative_to(PurePath(path).anchor)
        drive = PurePath(path).drive.rstrip(":\\/")
        parts = [OUTSIDE_PREFIX] + ([drive] if drive else []) + list(anchorless.parts)
        return "/".join(parts)
    return PurePath(rel).as_posix()


def _order_columns(df: pd.DataFrame) -> pd.DataFrame:
    first = [c for c in STANDARD_COLUMNS + DERIVED_COLUMNS if c in df.columns]
    return df[first + [c for c in df.columns if c not in first]]


# --- building from a folder ---------------------------------------------------------


def manifest_from_folder(
    root: str | os.PathLike,
    labelled: bool | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    masks_dir: str | None = "masks",
) -> pd.DataFrame:
    """Build a manifest from ``ROOT/<site>/<label>/...`` or ``ROOT/<site>/...``.

    labelled: None detects the layout: labelled when every image sits exactly two levels
    below ROOT (site/label/file), unlabelled otherwise. With labelled=True deeper trees
    are fine; the first folder below the site is the label.
    extensions: image suffixes (case-insensitive). Files without one of them are still
    taken when they carry the DICOM magic bytes (and '.dcm' is among the extensions).
    masks_dir: a folder of ROOT that mirrors the image tree with ROI masks
    (``ROOT/masks/<site>/<label>/<name>``); it is not a site, and masks found there fill
    the ``mask`` column. Hidden files and folders are skipped.
    patient_id is the file stem: one image per patient is assumed (write a manifest if a
    patient has several images). A stem used at several sites is qualified as
    ``<site>:<stem>``, since a folder layout cannot tell that two hospitals share a patient.
    Rows are sorted by relative path, so the result is deterministic.
    """
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder; expected ROOT/<site>/<label>/images")
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    sniff_dicom = ".dcm" in exts or ".dicom" in exts
    loose = [p.name for p in sorted(root.iterdir())
             if p.is_file() and _is_image(p, exts, sniff_dicom=False)]
    if loose:
        raise ValueError(f"{root}: image files directly in the root ({loose[:3]}...); "
                         "expected ROOT/<site>/<label>/<image> or ROOT/<site>/<image>")
    site_dirs = [p for p in sorted(root.iterdir())
                 if p.is_dir() and not p.name.startswith(".") and p.name != masks_dir]
    found: list[tuple[str, tuple[str, ...]]] = []  # (site, parts below the site folder)
    for site_dir in site_dirs:
        for file in _walk(site_dir):
            if _is_image(file, exts, sniff_dicom):
                found.append((site_dir.name, file.relative_to(site_dir).parts))
    if not found:
        raise ValueError(f"{root}: no images with suffixes {', '.join(exts)} in "
                         "ROOT/<site>/... folders")
    if labelled is None:
        labelled = all(len(parts) == 2 for _, parts in found)
    elif labelled:
        flat = [f"{site}/{parts[0]}" for site, parts in found if len(parts) < 2]
        if flat:
            raise ValueError(f"{root}: labelled=True but {len(flat)} image(s) sit directly in "
                             f"a site folder (e.g. {flat[0]}); expected ROOT/<site>/<label>/...")
    rows = []
    for site, parts in found:
        rel = "/".join((site, *parts))
        stem = _stem(parts[-1])
        mask = root / masks_dir / rel if masks_dir else None
        rows.append({
            "path": str(root / rel),
            "site": site,
            "label": parts[0] if labelled else "",
            "patient_id": stem,
            "node": site,
            "mask": str(mask) if mask is not None and mask.is_file() else "",
            "relpath": rel,
        })
    df = pd.DataFrame(rows, dtype=str).sort_values("relpath", kind="stable")
    sites_per_stem = df.groupby("patient_id")["site"].nunique()
    shared = df["patient_id"].map(sites_per_stem) > 1
    df.loc[shared, "patient_id"] = df.loc[shared, "site"] + ":" + df.loc[shared, "patient_id"]
    if not (df["mask"] != "").any():
        df = df.drop(columns="mask")
    return _order_columns(df.reset_index(drop=True))


def _walk(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def _is_image(path: Path, exts: tuple[str, ...], sniff_dicom: bool) -> bool:
    name = path.name.lower()
    if name.endswith(exts):
        return True
    return sniff_dicom and has_dicom_magic(path)


def _stem(name: str) -> str:
    for double in (".nii.gz",):
        if name.lower().endswith(double):
            return name[: -len(double)]
    return Path(name).stem


# --- saving -------------------------------------------------------------------------


def save_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write `df` as a manifest at `path`, paths relative to its folder, atomically.

    Absolute ``path``/``mask`` values (as `load_manifest` gives) are made relative to the
    new file's folder; relative ones are taken as relative to the working directory.
    ``relpath`` is derived and not written. Standard columns come first.
    """
    path = Path(os.path.abspath(path))
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(path, [(None, f"cannot save: missing column(s) {missing}")])
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    out = df.drop(columns=[c for c in DERIVED_COLUMNS if c in df.columns]).copy()
    out["path"] = [_relative_to(p, folder) for p in out["path"].astype(str)]
    if "mask" in out.columns:
        out["mask"] = [_relative_to(m, folder) if m else "" for m in out["mask"].astype(str)]
    out = _order_columns(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            out.to_csv(fh, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _relative_to(value: str, folder: Path) -> str:
    full = os.path.abspath(value)
    try:
        return PurePath(os.path.relpath(full, folder)).as_posix()
    except ValueError:  # another drive on Windows: only an absolute path works
        return full


# --- binary labels ------------------------------------------------------------------


def positive_label(labels: Iterable[str]) -> str:
    """The positive class of binary labels: the one that is not a negative spelling.

    Negative spellings (case-insensitive): normal, negative, neg, 0, false, healthy, no,
    none, control. A single non-negative label is taken as positive (e.g. a subset with
    only 'tb'). Raises ValueError when this cannot be decided; pass the positive explicitly
    to `binary_targets` then.
    """
    distinct = sorted({str(x).strip() for x in labels} - {""})
    others = [x for x in distinct if x.lower() not in NEGATIVE_LABELS]
    if len(distinct) > 2:
        raise ValueError(f"labels {distinct}: binary labels expected (2 classes), "
                         f"found {len(distinct)}; pass positive=... for one-vs-rest")
    if len(others) == 1:
        return others[0]
    if not distinct:
        raise ValueError("no labels (unlabelled data): there is no positive class")
    raise ValueError(
        f"labels {distinct}: cannot tell the positive class; name the negative one "
        f"{'/'.join(sorted(NEGATIVE_LABELS))} or pass positive=... explicitly"
    )


def binary_targets(df: pd.DataFrame, positive: str | None = None) -> np.ndarray:
    """0/1 targets from ``df.label`` (int64); -1 where the label is empty (unlabelled).

    positive: the positive class; None decides it with `positive_label`. A subset with
    only negative-spelled labels (e.g. all 'normal') gives all zeros.
    """
    labels = df["label"].astype(str).str.strip().to_numpy()
    present = sorted(set(labels) - {""})
    if positive is None and present:
        if all(x.lower() in NEGATIVE_LABELS for x in present) and len(present) == 1:
            positive = ""  # matches nothing non-empty: all zeros
        else:
            positive = positive_label(present)
    targets = np.where(labels == positive, 1, 0).astype(np.int64)
    targets[labels == ""] = -1
    return targets


def select_rows(manifest: str | os.PathLike, sites: list[str] | None = None,
                split: str | None = None) -> tuple[pd.DataFrame, list[str], str]:
    """The rows of a manifest's `split` (all rows when None), checking that every site in
    `sites` is present there (the caller filters: some also need the other sites).

    Returns (rows, sites present in them, a description of the rows for messages).
    Raises ConfigError naming what does not match (config keys data.split / data.sites).
    """
    from harmonize.configs import ConfigError

    df = load_manifest(manifest)
    df["manifest_row"] = df.index + 1  # data row of the file, for messages after filtering
    where = f"{manifest}"
    if split is not None:
        if "split" not in df.columns:
            raise ConfigError(f"data.split='{split}' but {where} has no split column")
        df = df[df["split"] == split.lower()]
        if df.empty:
            raise ConfigError(f"{where}: no rows with split '{split}'")
        where += f" (split {split})"
    present = sorted(df["site"].astype(str).unique())
    if sites is not None:
        missing = [s for s in sites if s not in present]
        if missing:
            raise ConfigError(f"data.sites names {missing}, not in {where}; sites present: "
                              f"{', '.join(present)}")
    return df.reset_index(drop=True), present, where
