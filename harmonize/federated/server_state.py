"""The server's checkpoint of a federated run, so that `harmonize federated --resume`
continues a run that was killed (SIGKILL, a reboot) from its last saved round.

Every `checkpoint_every` aggregated rounds (and the last) the server writes OUT/server_state
atomically (a temp folder renamed over the old one): the global arrays, the server
optimizer's state (FedOpt's Adam moments), the round log that rounds.csv is made of, and
the config that ran. Resuming loads them, checks the config is the same apart from the
number of rounds, and tells the nodes the round offset, so every round keeps its number
(the nodes' seeds, the learning-rate schedule and the DP accounting depend on it).

What a node keeps between rounds (FedBN's layers, its optimizer moments, CycleGAN's
image pools) is saved by the node beside it (`node_state_path`) at the same rounds and
loaded on resume, so at K = 1 a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harmonize.configs import ConfigError

STATE_DIR = "server_state"
Arrays = dict[str, torch.Tensor]
# config keys a resumed run may change (how long, how verbose), not what it trains
MAY_CHANGE = ("rounds", "resume", "progress", "checkpoint_every")


def is_checkpoint_round(server_round: int, every: int, rounds: int) -> bool:
    return server_round % every == 0 or server_round == rounds


def save_server_state(out: Path, server_round: int, arrays: Arrays, optimizer_state: dict | None,
                      log: dict, config: dict) -> None:
    """Replace OUT/server_state atomically: an interruption leaves the old or the new."""
    final, tmp = out / STATE_DIR, out / f".{STATE_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in arrays.items()},
              str(tmp / "arrays.safetensors"))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(
        {"round": server_round, "log": {str(k): v for k, v in log.items()},
         "config": config}, indent=1, default=str))
    old = out / f".{STATE_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def check_resumable(out: Path, config: dict) -> dict:
    """The saved state.json, if `config` may continue it (only its small JSON is read, so
    the CLI can refuse before the simulation starts); else a ConfigError saying why."""
    state = out / STATE_DIR
    if not (state / "state.json").is_file():
        raise ConfigError(f"--resume: {state} not found (no round was saved; runs save every "
                          "checkpoint_every rounds); start without --resume")
    saved = json.loads((state / "state.json").read_text())
    differ = sorted(k for k in set(saved["config"]) | set(config)
                    if k not in MAY_CHANGE and saved["config"].get(k) != config.get(k))
    if differ:
        raise ConfigError(f"--resume: {', '.join(differ)} differ from the saved run in {out}; "
                          "resume with the same config (only rounds may change)")
    return saved


def load_server_state(out: Path, config: dict) -> tuple[int, Arrays, dict | None, dict]:
    """(round done, global arrays, optimizer state, round log) of the saved run; refuses
    a config that trains something else."""
    saved = check_resumable(out, config)
    state = out / STATE_DIR
    optimizer = (torch.load(state / "optimizer.pt", weights_only=False)
                 if (state / "optimizer.pt").is_file() else None)
    log = {int(k): v for k, v in saved["log"].items()}
    return int(saved["round"]), load_file(str(state / "arrays.safetensors")), optimizer, log


def node_state_path(out: Path, node: str, server_round: int) -> Path:
    """Where a node keeps its local state of `server_round` (on its own disk)."""
    return Path(out) / "nodes" / node / f"local_round{server_round:06d}.safetensors"


def save_node_state(out: Path, node: str, server_round: int, local: Arrays,
                    keep: int = 2) -> None:
    """The node's local state at a checkpoint round (atomic); the oldest beyond `keep`
    checkpoint rounds are removed."""
    path = node_state_path(out, node, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in local.items()}, str(tmp))
    os.replace(tmp, path)
    for stale in sorted(path.parent.glob("local_round*.safetensors"))[:-keep]:
        stale.unlink(missing_ok=True)


def load_node_state(out: Path, node: str, server_round: int) -> Arrays | None:
    path = node_state_path(out, node, server_round)
    return load_file(str(path)) if path.is_file() else None
