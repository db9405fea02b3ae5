"""A federated run killed with SIGKILL resumes from its last saved round and ends where
an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from safetensors.torch import load_file

from harmonize.cli import main

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 30


def write_config(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "task": "classifier", "rounds": ROUNDS, "checkpoint_every": 2, "threads_per_node": 1,
        "evaluate": False, "classifier": {"model": {"arch": "cnn", "width": 4},
                                          "image_size": 32, "local_epochs": 1,
                                          "batch_size": 8}}))
    return path


def args(config: Path, data: Path, out: Path) -> list[str]:
    return ["federated", "-q", "--config", str(config), "--data", str(data / "manifest.csv"),
            "--out", str(out)]


def saved_round(out: Path) -> int:
    try:
        return json.loads((out / "server_state" / "state.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return 0


def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_model(synth3, tmp_path):
    config = write_config(tmp_path / "c.yaml")
    assert main(args(config, synth3, tmp_path / "straight")) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "harmonize.cli", *args(config, synth3, killed)],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while saved_round(killed) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the server, the simulation, its node processes
    proc.wait()
    at = saved_round(killed)
    if (killed / "summary.json").exists() or at >= ROUNDS:
        pytest.skip("the run finished before it could be killed (a very fast machine)")
    assert 4 <= at < ROUNDS and not (killed / "model").exists()

    # only the number of rounds may change
    assert main([*args(config, synth3, killed), "--resume", "--set", "seed=1"]) == 1
    assert main([*args(config, synth3, killed), "--resume"]) == 0
    rounds = pd.read_csv(killed / "rounds.csv")
    assert len(rounds) == ROUNDS and rounds["aggregated"].all()
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    # the server averages in node order and every round keeps its number (seeds): exact
    assert all((a[k] == b[k]).all() for k in a)


def test_resume_checks_before_anything_starts(synth3, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    assert main([*args(config, synth3, tmp_path / "none"), "--resume"]) == 1
    assert "--resume:" in capsys.readouterr().err
    state = tmp_path / "saved" / "server_state"
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"round": 2, "log": {}, "config": {
        "task": "classifier", "seed": 7}}))
    assert main([*args(config, synth3, tmp_path / "saved"), "--resume"]) == 1
    assert "seed" in capsys.readouterr().err
