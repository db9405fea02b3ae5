"""Radiomics features of many 2D images, one row per image (each image:
`image_features`).

`extract_features` runs over a manifest in parallel (processes, or a Ray cluster),
reuses cached results (`cache`), and returns per-image problems as error records
instead of raising, so one bad file does not cost the report on all the others.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from harmonize.radiomics.cache import FeatureCache, cache_key, default_cache_dir
from harmonize.radiomics.image_features import (
    CLASS_ORDER,
    FEATURE_PREFIX,
    META_COLUMNS,
    Item,
    Result,
)
from harmonize.radiomics.settings import RadiomicsSettings


def extract_features(
    df: pd.DataFrame | Sequence[str | os.PathLike],
    settings: RadiomicsSettings,
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
    ray_address: str | None = None,
    chunk_size: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Features for every image of a manifest, and error records for those that failed.

    df: a manifest (``path``; ``mask`` optional, empty = automatic mask; every other
        column is carried into both outputs) or a list of image paths.
    workers: processes (default: all available cores); 1 runs in this process.
    cache_dir: default `default_cache_dir()`; use_cache=False neither reads nor writes.
    ray_address: run on Ray instead of local processes: "local" starts a local Ray with
        `workers` CPUs, anything else is passed to ``ray.init(address=...)`` ("auto", or
        "ray://head:10001"). Cluster nodes need harmonize installed and the images (at
        the same paths) on a shared filesystem; the cache is read and written here.
    Returns (features, errors): features has one row per successful image in manifest
    order (manifest columns; mask_source, roi_pixels, height, width; then the features,
    ``original_<class>_<name>``, NaN where a class was not computed, e.g. shape2D);
    errors has the manifest columns and ``error``.
    """
    frame = _as_frame(df)
    n = len(frame)
    paths = [os.path.abspath(p) for p in frame["path"].astype(str)]
    masks = _mask_list(frame)
    records: list[dict | None] = [None] * n
    errors: list[str | None] = [None] * n
    cache = FeatureCache(cache_dir or default_cache_dir()) if use_cache else None
    keys: list[str | None] = [None] * n
    if cache is not None:
        keys, hits = _lookup(cache, paths, masks, settings.digest())
        for i, rec in hits.items():
            records[i] = rec
    todo: list[Item] = [(i, paths[i], masks[i]) for i in range(n) if records[i] is None]
    workers = max(1, workers or available_cpus())

    with tqdm(total=n, initial=n - len(todo), desc="radiomics", unit="img",
              disable=not progress) as bar:

        def on_chunk(results: list[Result]) -> None:
            for i, rec, err in results:
                records[i], errors[i] = rec, err
                if rec is not None and cache is not None and keys[i] is not None:
                    cache.put(keys[i], rec)
            bar.update(len(results))

        if todo:
            from harmonize.radiomics import parallel

            size = chunk_size or _auto_chunk(len(todo), workers)
            chunks = [todo[k:k + size] for k in range(0, len(todo), size)]
            if ray_address is not None:
                parallel.run_ray(chunks, settings, ray_address, workers, on_chunk)
            elif workers == 1 or len(todo) == 1:
                parallel.run_inline(chunks, settings, on_chunk)
            else:
                parallel.run_processes(chunks, settings, workers, on_chunk)
    return _frames(frame, records, errors)


def feature_columns(features: pd.DataFrame) -> list[str]:
    """The pyradiomics feature columns of an `extract_features` result."""
    return [c for c in features.columns if str(c).startswith(FEATURE_PREFIX)]


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _as_frame(df: pd.DataFrame | Sequence[str | os.PathLike]) -> pd.DataFrame:
    if isinstance(df, pd.DataFrame):
        if "path" not in df.columns:
            raise ValueError(f"no 'path' column in {list(df.columns)}: pass a manifest "
                             "(harmonize.data.manifest.load_manifest) or a list of paths")
        return df.reset_index(drop=True)
    return pd.DataFrame({"path": [str(p) for p in df]})


def _mask_list(frame: pd.DataFrame) -> list[str | None]:
    if "mask" not in frame.columns:
        return [None] * len(frame)
    return [os.path.abspath(m) if isinstance(m, str | Path) and str(m) else None
            for m in frame["mask"]]


def _lookup(cache: FeatureCache, paths: list[str], masks: list[str | None],
            digest: str) -> tuple[list[str | None], dict[int, dict]]:
    """Cache keys and hits; hashing is file I/O (GIL released), so threads suffice."""

    def one(i: int) -> tuple[str | None, dict | None]:
        try:
            key = cache_key(paths[i], masks[i], digest)
        except OSError:  # unreadable: extraction reports it with a proper message
            return None, None
        return key, cache.get(key)

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(paths)))) as pool:
        found = list(pool.map(one, range(len(paths))))
    keys = [k for k, _ in found]
    hits = {i: rec for i, (_, rec) in enumerate(found) if rec is not None}
    return keys, hits


def _auto_chunk(n_todo: int, workers: int) -> int:
    """About 8 chunks per worker (load balance: the calling process takes whole chunks
    between collecting the others'), at most 16 images (progress, memory)."""
    return max(1, min(16, -(-n_todo // (workers * 8))))


def _frames(frame: pd.DataFrame, records: list[dict | None],
            errors: list[str | None]) -> tuple[pd.DataFrame, pd.DataFrame]:
    ok = [i for i, rec in enumerate(records) if rec is not None]
    names: dict[str, None] = {}
    for i in ok:
        names.update(dict.fromkeys(records[i]["features"]))

    def rank(name: str) -> int:
        family = name[len(FEATURE_PREFIX):].split("_", 1)[0]
        return CLASS_ORDER.index(family) if family in CLASS_ORDER else len(CLASS_ORDER)

    columns = sorted(names, key=rank)  # stable: pyradiomics' order within a class
    values = np.full((len(ok), len(columns)), np.nan)
    position = {c: j for j, c in enumerate(columns)}
    for row, i in enumerate(ok):
        for name, value in records[i]["features"].items():
            values[row, position[name]] = value
    meta = frame.iloc[ok].reset_index(drop=True)
    meta["mask_source"] = [records[i]["mask_source"] for i in ok]
    for col in META_COLUMNS[1:]:
        meta[col] = np.array([records[i][col] for i in ok], dtype=np.int64)
    features = pd.concat([meta, pd.DataFrame(values, columns=columns)], axis=1)
    failed = [i for i, rec in enumerate(records) if rec is None]
    errs = frame.iloc[failed].reset_index(drop=True)
    errs["error"] = [errors[i] or "not processed" for i in failed]
    return features, errs
