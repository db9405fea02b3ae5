"""The deployment engine on loopback: a SuperLink and SuperNodes as separate processes on
127.0.0.1 run short federated jobs submitted with `flwr run .`, the same code a
multi-hospital deployment runs with other addresses. The first test runs `--insecure`
(loopback only); the second runs as docs/federated.md tells hospitals to: TLS with a
certificate authority the test makes, and SuperNode authentication (only registered
public keys may join; an unregistered node is refused)."""

from __future__ import annotations

import contextlib
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
from throwaway_pki import make_node_keys, make_tls_files

from harmonize.classify.train import load_classifier
from harmonize.synth import generate
from harmonize.translators import load_translator

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(shutil.which("flower-superlink", path=str(BIN)) is None,
                                reason="flwr CLI not installed")


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


def classifier_config(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "task": "classifier", "rounds": 2, "threads_per_node": 1, "evaluate": False,
        "classifier": {"model": {"arch": "cnn", "width": 4}, "image_size": 32,
                       "local_epochs": 1, "batch_size": 8}}))
    return path


class Deployment:
    """A SuperLink and SuperNodes on loopback; `tls` holds ca/cert/key files (None: insecure)."""

    def __init__(self, folder: Path, tls: dict[str, Path] | None = None):
        self.folder, self.tls = folder, tls
        self.port = free_port()
        home = folder / "flwr_home"
        home.mkdir(parents=True)
        security = (f'root-certificates = "{tls["ca"]}"\n' if tls else "insecure = true\n")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}')
        # the SuperLink and SuperNodes spawn flower-superexec / flwr-clientapp from PATH
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: list = []

    def _start(self, name: str, command: list) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        self.logs.append(log)
        self.procs[name] = subprocess.Popen([str(c) for c in command], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT)
        return self.procs[name]

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def start_superlink(self, *, authenticate_nodes: bool = False) -> None:
        security = (["--ssl-ca-certfile", self.tls["ca"], "--ssl-certfile", self.tls["cert"],
                     "--ssl-keyfile", self.tls["key"]] if self.tls else ["--insecure"])
        self._start("link", [BIN / "flower-superlink", *security,
                             *(["--enable-supernode-auth"] if authenticate_nodes else []),
                             "--host", "127.0.0.1", "--port", self.port,
                             "--disable-runtime-dependency-installation"])
        wait_for_port(self.port)

    def register(self, public_key: Path) -> None:
        done = subprocess.run([BIN / "flwr", "supernode", "register", public_key, "loopback"],
                              env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr

    def start_supernode(self, name: str, partition: int, partitions: int,
                        private_key: Path | None = None, retries: int | None = None):
        security = (["--root-certificates", self.tls["ca"]] if self.tls else ["--insecure"])
        key = ["--auth-supernode-private-key", private_key] if private_key else []
        retry = ["--max-retries", retries] if retries is not None else []
        return self._start(name, [
            BIN / "flower-supernode", *security, *key, *retry, "--superlink",
            f"127.0.0.1:{self.port}", "--port", free_port(), "--node-config",
            f"partition-id={partition} num-partitions={partitions}"])

    def submit(self, config: Path, manifest: Path, out: Path) -> dict:
        run_config = (f"config='{config}' data='{manifest}' out='{out}' "
                      "min-nodes=2 reference-site='site_a'")
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "loopback", "--stream",
             "--run-config", run_config],
            env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["failures"] == [] and summary["nodes"] == 2
        return summary

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in self.logs:
            log.close()


@contextlib.contextmanager
def deployment(folder: Path, tls: dict[str, Path] | None = None):
    running = Deployment(folder, tls)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def two_sites(tmp_path) -> Path:
    data = tmp_path / "synth"
    generate(data, sites=2, per_site=12, size=32, seed=0, progress=False,
             prevalence=[0.5, 0.5])
    return data / "manifest.csv"


@pytest.mark.slow  # 65 s; the deployment itself is tested by the TLS test below, the
# translator apps by the simulation tests (the same ClientApp / ServerApp)
def test_superlink_and_supernodes_on_loopback_run_translator_jobs(tmp_path, two_sites):
    """The translators in a deployment (the classifier runs in the TLS test below):
    CycleGAN (site_b's node and the reference node), DDIB with local priors (each node
    keeps its own translator)."""
    with deployment(tmp_path) as link:
        link.start_superlink()
        for i in range(2):
            link.start_supernode(f"node{i}", i, 2)
        summary = link.submit(translator_config(tmp_path / "cg.yaml", "cyclegan"), two_sites,
                              tmp_path / "cyclegan")
        assert load_translator(summary["model"]).kind == "cyclegan"
        summary = link.submit(translator_config(tmp_path / "dd.yaml", "diffusion"), two_sites,
                              tmp_path / "ddib")
        assert sorted(summary["node_models"]) == ["site_a", "site_b"]
        assert sorted(load_translator(summary["node_models"]["site_b"]).model_sites) == [
            "site_a", "site_b"]


def test_tls_and_registered_supernodes_only(tmp_path, two_sites):
    tls = make_tls_files(tmp_path / "pki")
    keys = {name: make_node_keys(tmp_path / "keys", name)
            for name in ("hospital0", "hospital1", "stranger")}
    with deployment(tmp_path, tls) as link:
        link.start_superlink(authenticate_nodes=True)
        for name in ("hospital0", "hospital1"):
            link.register(keys[name][1])
        # a node whose key the coordinator never registered is refused and gives up
        stranger = link.start_supernode("stranger", 0, 2, keys["stranger"][0], retries=1)
        assert stranger.wait(timeout=120) != 0
        assert "No SuperNode found with the given public key" in link.log("link")
        for i, name in enumerate(("hospital0", "hospital1")):
            link.start_supernode(name, i, 2, keys[name][0])
        summary = link.submit(classifier_config(tmp_path / "fed.yaml"), two_sites,
                              tmp_path / "classifier")
        assert load_classifier(Path(summary["model"]))[2]["federated"]["rounds"] == 2
        assert "Uvicorn running on https://" in link.log("link")
