"""Which rows of the data a node may read. In simulation every node reads its own rows of
one manifest (``node`` column, default = site); in a deployment each hospital's SuperNode
points at its own manifest (``--node-config "node='site_b' manifest='/data/m.csv'"``)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pandas as pd

from harmonize.data.manifest import load_manifest


def read_manifest(manifest: str | Path) -> pd.DataFrame:
    """The manifest, read once per process while the file is unchanged: every message of
    every round needs the node's rows, and re-reading cost 26 ms per message (a third of
    the simulation's per-round overhead, docs/performance.md). Do not modify the frame."""
    st = os.stat(manifest)
    return _read_manifest(str(manifest), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _read_manifest(path: str, mtime_ns: int, size: int) -> pd.DataFrame:
    return load_manifest(path)


def node_names(manifest: str | Path) -> list[str]:
    """Sorted node names; partition-id i of the simulation is the i-th."""
    return sorted(read_manifest(manifest)["node"].astype(str).unique())


def resolve_node(node_config: dict, manifest: str | Path | None) -> tuple[str, Path]:
    """(node name, manifest path) of this SuperNode."""
    own = node_config.get("manifest")
    path = Path(str(own)) if own else (Path(manifest) if manifest else None)
    if path is None:
        raise ValueError("no manifest for this node: give the run a manifest or start the "
                         "SuperNode with --node-config \"manifest='/path/m.csv'\"")
    if "node" in node_config:
        return str(node_config["node"]), path
    names = node_names(path)
    pid = int(node_config.get("partition-id", 0))
    if pid >= len(names):
        raise ValueError(f"partition {pid}: {path} has only {len(names)} node(s) {names}")
    return names[pid], path


def node_rows(manifest: str | Path, node: str) -> pd.DataFrame:
    """This node's rows; a clear error when the manifest is unreadable or has none."""
    try:
        df = read_manifest(manifest)
    except (OSError, ValueError) as err:
        raise ValueError(f"node '{node}': cannot read its manifest {manifest}: {err}") from None
    rows = df[df["node"].astype(str) == node]
    if rows.empty:
        raise ValueError(f"node '{node}': no rows for this node in {manifest} (node column "
                         f"has {sorted(df['node'].astype(str).unique())}); fix the manifest")
    return rows.reset_index(drop=True)


def split_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, test): the manifest's split column if present, else all rows train."""
    if "split" not in rows.columns:
        return rows, rows.iloc[:0]
    test = rows["split"].astype(str) == "test"
    return rows[~test].reset_index(drop=True), rows[test].reset_index(drop=True)


def fill_site_lists(cfg):
    """The site orders every node must agree on (CycleGAN's conditions, the diffusion
    prior's class labels), from the manifest when the config does not give them."""
    if cfg.manifest is None or not Path(cfg.manifest).is_file():
        return cfg
    sites = sorted(read_manifest(cfg.manifest)["site"].astype(str).unique())
    if cfg.task == "cyclegan" and cfg.cyclegan.sites is None:
        cfg.cyclegan.sites = [s for s in sites if s != cfg.reference_site]
    if cfg.task == "diffusion" and cfg.diffusion.sites is None:
        cfg.diffusion.sites = sites
    return cfg
