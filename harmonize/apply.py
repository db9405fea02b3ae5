"""Batch harmonization of a folder or manifest with a trained translator.

OUT mirrors IN's tree with the same file names, formats and dtypes. Files are decoded
by a small thread pool while the translator works on the previous batch, and written
atomically, so an interrupted run leaves only complete outputs; ``resume`` skips every
output that exists. Each file gets one row in ``apply_log.csv`` (ok / skipped / error
with the reason); a bad file never stops the batch.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from harmonize.data.intensity import IntensityParams
from harmonize.data.io import (
    SUPPORTED,
    ImageReadError,
    ImageWriteError,
    MedicalImage,
    has_dicom_magic,
    is_image_file,
    read_image,
    write_image,
)
from harmonize.radiomics.masks import ROIError, optional_mask
from harmonize.rerun import replacing_outputs
from harmonize.translators import Translator

LOG_NAME = "apply_log.csv"
LOG_COLUMNS = ["time", "input", "output", "site", "status", "reason", "seconds"]


@dataclass
class ApplyItem:
    source: Path
    relpath: Path
    site: str | None = None
    mask: Path | None = None  # the manifest's ROI mask, for translators that use masks


@dataclass
class ApplySummary:
    ok: int = 0
    skipped: int = 0
    not_images: int = 0  # of the skipped: files that are not images
    errors: int = 0
    log_path: Path | None = None
    error_files: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.ok + self.skipped + self.errors


@dataclass
class _Loaded:
    item: ApplyItem
    image: MedicalImage
    x: np.ndarray
    params: IntensityParams
    started: float
    mask: np.ndarray | None = None


MANIFEST_NAME = "manifest.csv"


def mirrored_relpaths(df) -> list[Path]:
    """Where each manifest row's output goes below an output folder: its path relative
    to the manifest's folder; for images outside that folder, the tree below their
    common root (what `harmonize apply MANIFEST OUT` writes, and what readers of OUT
    must expect)."""
    relpaths = [Path(r) for r in df["relpath"]]
    if any(r.parts[0] == "_outside" for r in relpaths):
        root = Path(os.path.commonpath(list(df["path"])))
        root = root if len(df) > 1 else root.parent
        relpaths = [Path(p).relative_to(root) for p in df["path"]]
    return relpaths

def discover_inputs(
    inp: str | os.PathLike, out: str | os.PathLike | None = None,
    mask_column: str | None = None,
) -> list[ApplyItem]:
    """Files to harmonize: a manifest's rows; a folder holding a manifest.csv (e.g. the
    synthetic benchmark's root): that manifest's rows, so its masks/ and reference/ are
    not taken for sites; or every visible file under a folder (non-images included, so
    they are logged as skipped rather than silently ignored), each with its site from a
    manifest.csv one or two folders up when that lists it (a site's own folder inside a
    dataset), else from its first folder below IN."""
    inp = Path(inp)
    if inp.is_dir() and (inp / MANIFEST_NAME).is_file():
        inp = inp / MANIFEST_NAME
    if inp.is_file() and inp.suffix.lower() == ".csv":
        from harmonize.data.manifest import load_manifest

        df = load_manifest(inp, mask_column=mask_column)
        relpaths = mirrored_relpaths(df)
        masks = [Path(m) if m else None for m in df["mask"]] if "mask" in df else [None] * len(df)
        return [ApplyItem(Path(p), r, s, m)
                for p, r, s, m in zip(df["path"], relpaths, df["site"], masks, strict=True)]
    if not inp.is_dir():
        raise FileNotFoundError(f"{inp}: input is neither a folder nor a manifest .csv")
    if mask_column is not None:
        raise ValueError(f"{inp}: a mask column ('{mask_column}') needs a manifest as input; "
                         "give the manifest .csv (masks are only read from manifests)")
    out_resolved = Path(out).resolve() if out is not None else None
    known_sites = _sites_from_manifest_above(inp)
    items = []
    for root, dirs, files in os.walk(inp):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (root_path / d).resolve() != out_resolved)
        for name in sorted(files):
            if name.startswith(".") or (name.startswith("apply_log") and name.endswith(".csv")):
                continue
            rel = (root_path / name).relative_to(inp)
            site = known_sites.get(str((root_path / name).resolve()))
            if site is None:
                site = rel.parts[0] if len(rel.parts) > 1 else None
            items.append(ApplyItem(root_path / name, rel, site))
    return items


def _sites_from_manifest_above(folder: Path) -> dict[str, str]:
    """resolved path -> site, from a manifest.csv in one of the two folders above."""
    from harmonize.data.manifest import load_manifest

    for parent in list(folder.resolve().parents)[:2]:
        if (parent / MANIFEST_NAME).is_file():
            try:
                df = load_manifest(parent / MANIFEST_NAME)
            except (ValueError, OSError):
                return {}  # not a usable manifest: fall back to the folder names
            return {str(Path(p).resolve()): str(s)
                    for p, s in zip(df["path"], df["site"], strict=True)}
    return {}


class _Log:
    """apply_log.csv, appended row by row so a crash loses nothing already logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        new = not path.exists()
        self._fh = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=LOG_COLUMNS)
        if new:
            self._writer.writeheader()

    def row(self, item: ApplyItem, output: Path, status: str, reason: str = "",
            seconds: float = 0.0) -> None:
        self._writer.writerow({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "input": str(item.source),
            "output": str(output), "site": item.site or "", "status": status,
            "reason": " ".join(str(reason).split()),  # one line per file, whatever the error
            "seconds": f"{seconds:.4f}",
        })
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def apply_translator(
    translator: Translator,
    inp: str | os.PathLike,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    batch_size: int = 8,
    io_workers: int = 2,
    progress: bool = True,
    derivation: str | None = None,
    mask_column: str | None = None,
) -> ApplySummary:
    """Harmonize every file of `inp` (folder or manifest) into `out`; a manifest's ROI
    masks (`mask_column`, default `mask`) go to translators that use them."""
    out = Path(out)
    rank, world = process_shard()
    # each file to exactly one process
    items = discover_inputs(inp, out, mask_column)[rank::world]
    if not resume and rank == 0:
        replacing_outputs(out, "outputs")
    out.mkdir(parents=True, exist_ok=True)  # only once the input is known to be valid
    if derivation is None:  # the identity and fingerprint removal map to no site
        target = (f"to site '{translator.reference_site_}' "
                  if translator.reference_site_ not in (None, "any") else "")
        derivation = f"harmonized {target}by the {translator.kind} translator"
    log = _Log(out / (LOG_NAME if rank == 0 else f"apply_log.rank{rank}.csv"))
    summary = ApplySummary(log_path=log.path)
    bar = tqdm(total=len(items), desc=f"apply {translator.kind}", unit="img",
               disable=not progress)

    def record(item: ApplyItem, status: str, reason: str = "", seconds: float = 0.0) -> None:
        log.row(item, out / item.relpath, status, reason, seconds)
        if status == "ok":
            summary.ok += 1
        elif status == "skipped":
            summary.skipped += 1
        else:
            summary.errors += 1
            summary.error_files.append(str(item.source))
        bar.update(1)

    if resume and rank == 0:  # temp files of an interrupted run (kill -9) are dead
        for stale in out.rglob(".*.partial*"):
            stale.unlink(missing_ok=True)
    todo = []
    for item in items:
        if resume and (out / item.relpath).exists():
            record(item, "skipped", "output exists (--resume)")
        elif not (is_image_file(item.source) or has_dicom_magic(item.source)):
            record(item, "skipped", f"not an image file ({item.source.suffix or 'no suffix'}; "
                   f"harmonize reads {SUPPORTED})")
            summary.not_images += 1
        else:
            todo.append(item)

    with ThreadPoolExecutor(max_workers=max(1, io_workers)) as pool:
        pending_writes: list[tuple[_Loaded, Future]] = []
        for batch in _batches(_load_all(translator, todo, pool, io_workers, record), batch_size):
            done = _translate_batch(translator, batch, record)
            for b, y in done:
                fut = pool.submit(write_image, b.image, _output_values(translator, b, y),
                                  out / b.item.relpath, derivation)
                pending_writes.append((b, fut))
            pending_writes = _drain(pending_writes, record, block=False)
        _drain(pending_writes, record, block=True)
    bar.close()
    log.close()
    return summary


def _output_values(translator: Translator, loaded: _Loaded, y: np.ndarray) -> np.ndarray:
    """What to write: an image the translator left as it was is written with the values it
    was read with, exactly (a float image's trip through float32 model space and back is
    off by up to one float32 step of the window, ~1e-5)."""
    if np.array_equal(y, loaded.x):
        return loaded.image.array
    return translator.policy.from_model(y, loaded.params)


def _reason(step: str, path: Path, err: Exception) -> str:
    """The log's sentence for a failure: harmonize's own errors name the file and the fix;
    anything else is unexpected, and said to be, with the file."""
    if isinstance(err, (ImageReadError, ImageWriteError)):
        return str(err)
    if isinstance(err, ROIError):  # the manifest's mask of this image: a data problem
        return f"{path}: ROI mask: {err}"
    detail = (str(err).splitlines() or [""])[0][:200]
    return (f"{path}: {step} failed unexpectedly ({type(err).__name__}: {detail}); "
            "please report it with the file")


def _translate_batch(translator: Translator, batch: list[_Loaded], record
                     ) -> list[tuple[_Loaded, np.ndarray]]:
    """(loaded, output) for every image of the batch that translates. When the batch
    fails, each image is tried alone, so one bad image costs only itself."""
    try:
        images, sites = [b.x for b in batch], [b.item.site for b in batch]
        outputs = (translator.transform(images, sites, masks=[b.mask for b in batch])
                   if translator.uses_masks else translator.transform(images, sites))
        return list(zip(batch, outputs, strict=True))
    except Exception as err:  # noqa: BLE001 - one bad image must not stop the job
        if len(batch) == 1:
            record(batch[0].item, "error", f"translation failed: {err}")
            return []
    return [pair for b in batch for pair in _translate_batch(translator, [b], record)]


def process_shard() -> tuple[int, int]:
    """(rank, number of processes) when started by `accelerate launch --multi_gpu` or
    torchrun (they set RANK and WORLD_SIZE), else (0, 1).

    Each process takes every n-th file of the sorted list, so no file is written twice,
    and logs to its own apply_log (rank 0: apply_log.csv, others apply_log.rank<k>.csv).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def _load_all(translator: Translator, todo: list[ApplyItem], pool: ThreadPoolExecutor,
              io_workers: int, record) -> Iterator[_Loaded]:
    """Decode files ahead of the translator (a bounded window of futures)."""

    def load(item: ApplyItem) -> _Loaded:
        started = time.perf_counter()
        image = read_image(item.source)
        x, params = translator.policy.to_model(image)
        mask = (optional_mask(item.mask, x.shape)
                if translator.uses_masks and item.mask is not None else None)
        return _Loaded(item, image, x, params, started, mask)

    window = 2 * max(1, io_workers)
    futures: list[tuple[ApplyItem, Future]] = []
    queue = iter(todo)
    for item in queue:
        futures.append((item, pool.submit(load, item)))
        if len(futures) >= window:
            break
    while futures:
        item, fut = futures.pop(0)
        nxt = next(queue, None)
        if nxt is not None:
            futures.append((nxt, pool.submit(load, nxt)))
        try:
            yield fut.result()
        except Exception as err:  # noqa: BLE001 - reported per file, the batch goes on
            record(item, "error", _reason("reading", item.source, err))


def _batches(loaded: Iterator[_Loaded], size: int) -> Iterator[list[_Loaded]]:
    batch: list[_Loaded] = []
    for item in loaded:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _drain(pending: list[tuple[_Loaded, Future]], record, block: bool):
    still = []
    for b, fut in pending:
        if not block and not fut.done():
            still.append((b, fut))
            continue
        try:
            fut.result()
            # an ok row says what was repaired in the source to write it (a damaged tag)
            repaired = "; ".join(b.image.repairs)
            record(b.item, "ok", f"source repaired: {repaired}" if repaired else "",
                   time.perf_counter() - b.started)
        except Exception as err:  # noqa: BLE001
            record(b.item, "error", _reason("writing", b.item.source, err))
    return still
