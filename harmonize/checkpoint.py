"""Checkpoint directories: weights in safetensors, config and metadata in JSON.

A checkpoint never holds a pickle, so loading one cannot run code. The directory is
written under a temporary name and renamed into place, so a crash mid-save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from harmonize import __version__

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METADATA = "metadata.json"


@dataclass
class Checkpoint:
    kind: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    metadata: dict[str, Any]


class CheckpointError(ValueError):
    """A directory is not a usable checkpoint; the message says what is missing."""


def save_checkpoint(
    directory: str | os.PathLike,
    kind: str,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    metadata: dict[str, Any],
) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS)
        _write_json(tmp / CONFIG, {"kind": kind, **config})
        meta = {"kind": kind, "harmonize_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **metadata}
        _write_json(tmp / METADATA, meta)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def checkpoint_dir(directory: str | os.PathLike) -> Path:
    """The checkpoint directory itself, given it or a training run's folder holding one
    in `model/` (what `harmonize train --out RUN` writes); raises CheckpointError naming
    what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not (directory / CONFIG).is_file() and (directory / "model" / CONFIG).is_file():
        directory = directory / "model"
    missing = [n for n in (WEIGHTS, CONFIG, METADATA) if not (directory / n).is_file()]
    if missing:
        raise CheckpointError(
            f"{directory}: not a harmonize checkpoint (missing {', '.join(missing)}); "
            "train one with `harmonize train ...`"
        )
    return directory


def checkpoint_kind(directory: str | os.PathLike) -> str:
    """The kind in config.json, without reading the weights."""
    path = checkpoint_dir(directory) / CONFIG
    kind = _read_json(path).get("kind")
    if not kind:
        raise CheckpointError(f"{path}: no 'kind' key")
    return kind


def load_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """Weights, config and metadata of a checkpoint (or of a run folder's `model/`)."""
    directory = checkpoint_dir(directory)
    config, metadata = _read_json(directory / CONFIG), _read_json(directory / METADATA)
    kind = config.pop("kind", None)
    if not kind:
        raise CheckpointError(f"{directory / CONFIG}: no 'kind' key")
    return Checkpoint(kind, load_file(directory / WEIGHTS), config, metadata)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}); the checkpoint is damaged: "
                              "train it again or restore the file") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object; the checkpoint is damaged")
    return value


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
