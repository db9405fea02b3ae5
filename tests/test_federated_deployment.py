"""The deployment engine on loopback: a SuperLink and two SuperNodes as separate
processes on 127.0.0.1 run a short federated job submitted with `flwr run .`, the same
code a multi-hospital deployment runs with other addresses (and TLS)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harmonize.classify.train import load_classifier
from harmonize.synth import generate
from harmonize.translators import load_translator

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, seconds: float = 60) -> None:
    end = time.time() + seconds
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None,
                    reason="flwr CLI not installed")
def translator_config(path: Path, task: str) -> Path:
    """A tiny federated translator config (32 px, narrow networks, a few steps)."""
    if task == "cyclegan":
        section = {"config": str(REPO / "configs/cyclegan/quick.yaml"), "local_steps": 2,
                   "set": {"data.image_size": 32, "model.ngf": 8, "model.n_blocks": 1,
                           "model.ndf": 8, "train.batch_size": 2}}
        config = {"task": "cyclegan", "rounds": 2, "evaluate": False, "cyclegan": section}
    else:
        section = {"config": str(REPO / "configs/diffusion/quick.yaml"), "prior": "local",
                   "local_steps": 2,
                   "set": {"data.image_size": 32, "model.block_out_channels": [8, 16],
                           "model.attention": [False, False], "model.norm_num_groups": 4,
                           "train.batch_size": 2, "inference.steps": 5}}
        config = {"task": "diffusion", "rounds": 1, "diffusion": section}
    path.write_text(yaml.safe_dump({**config, "threads_per_node": 1}))
    return path


def test_superlink_and_supernodes_on_loopback_run_a_job(tmp_path):
    data = tmp_path / "synth"
    generate(data, sites=2, per_site=12, size=32, seed=0, progress=False,
             prevalence=[0.5, 0.5])
    config = tmp_path / "fed.yaml"
    config.write_text(yaml.safe_dump({
        "task": "classifier", "rounds": 2, "threads_per_node": 1, "evaluate": False,
        "classifier": {"model": {"arch": "cnn", "width": 4}, "image_size": 32,
                       "local_epochs": 1, "batch_size": 8}}))
    home = tmp_path / "flwr_home"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    # the SuperLink and SuperNodes spawn flower-superexec / flwr-clientapp from PATH
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    logs = [open(tmp_path / f"{name}.log", "w") for name in ("link", "node0", "node1")]
    procs = [subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
         str(link), "--disable-runtime-dependency-installation"],
        env=env, stdout=logs[0], stderr=subprocess.STDOUT)]
    try:
        wait_for_port(link)
        for i in range(2):
            procs.append(subprocess.Popen(
                [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                 f"127.0.0.1:{link}", "--port", str(free_port()), "--node-config",
                 f"partition-id={i} num-partitions=2"],
                env=env, stdout=logs[i + 1], stderr=subprocess.STDOUT))
        def submit(config: Path, name: str) -> dict:
            out = tmp_path / name
            run_config = (f"config='{config}' data='{data / 'manifest.csv'}' out='{out}' "
                          "min-nodes=2 reference-site='site_a'")
            done = subprocess.run(
                [str(BIN / "flwr"), "run", str(REPO), "loopback", "--stream",
                 "--run-config", run_config],
                env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            summary = json.loads((out / "summary.json").read_text())
            assert summary["failures"] == [] and summary["nodes"] == 2
            return summary

        summary = submit(config, "classifier")
        model, cfg, meta = load_classifier(Path(summary["model"]))
        assert meta["federated"]["rounds"] == 2
        # the translators run in the same deployment: CycleGAN (site_b's node and the
        # reference node), DDIB with local priors (each node keeps its own translator)
        summary = submit(translator_config(tmp_path / "cg.yaml", "cyclegan"), "cyclegan")
        assert load_translator(summary["model"]).kind == "cyclegan"
        summary = submit(translator_config(tmp_path / "dd.yaml", "diffusion"), "ddib")
        assert sorted(summary["node_models"]) == ["site_a", "site_b"]
        assert sorted(load_translator(summary["node_models"]["site_b"]).model_sites) == [
            "site_a", "site_b"]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for fh in logs:
            fh.close()
