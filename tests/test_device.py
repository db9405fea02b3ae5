"""Device-sensitive paths, marked `gpu`: `eval/bench/gpu_check.sh` runs them on a GPU
(`pytest -m gpu`); the ones that need no GPU run in every suite on the CPU.

What a GPU run must show: the federated tasks train on the device they find and send
CPU arrays; inference on the GPU agrees with the CPU within kernel tolerance (TF32
convolutions, other reduction orders), and "auto" precision picks what the device runs
natively."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from harmonize.data.manifest import load_manifest
from harmonize.federated.config import load_federated_config
from harmonize.federated.tasks import build_task
from harmonize.synth import generate
from harmonize.training.device import native_bf16, pick_device, resolve_precision

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def synth3(tmp_path_factory):
    out = tmp_path_factory.mktemp("dev") / "synth"
    generate(out, sites=3, per_site=8, size=32, seed=0, progress=False,
             prevalence=[0.5, 0.5, 0.5])
    return out


TASKS = {
    "classifier": {"classifier": {"model": {"arch": "cnn", "width": 4}, "image_size": 32,
                                  "local_epochs": 1, "batch_size": 4}},
    "cyclegan": {"cyclegan": {"config": str(CONFIGS / "cyclegan/quick.yaml"),
                              "set": {"data.image_size": 32, "model.ngf": 8,
                                      "model.n_blocks": 1, "model.ndf": 8,
                                      "train.batch_size": 2}, "local_steps": 2}},
    "diffusion": {"diffusion": {"config": str(CONFIGS / "diffusion/quick.yaml"),
                                "set": {"data.image_size": 32, "model.block_out_channels": [8, 16],
                                        "model.attention": [False, False],
                                        "model.norm_num_groups": 4, "train.batch_size": 2,
                                        "inference.steps": 5},
                                "local_steps": 2, "sites": ["site_a", "site_b", "site_c"]}},
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_federated_tasks_train_on_the_device_and_send_cpu_arrays(task, synth3, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"task": task, "rounds": 2, **TASKS[task]}))
    sites = {"cyclegan.sites": ["site_b", "site_c"]} if task == "cyclegan" else {}
    cfg = load_federated_config(path, {"reference_site": "site_a", **sites})
    worker = build_task(cfg)
    df = load_manifest(synth3 / "manifest.csv")
    for node in ("site_a", "site_b"):  # the reference node and a source node
        rows = df[df["site"] == node]
        arrays = worker.initial_arrays()
        shared, own, metrics = worker.train(arrays, None, rows, {"server-round": 1, "nodes": 3})
        sent = {**shared, **own}
        assert sent and all(v.device.type == "cpu" for v in sent.values()), (task, node)
        assert all(np.isfinite(v) for k, v in metrics.items() if k != "num-examples")
        # round 2 with this node's kept state (optimizer moments, own networks)
        again, _, _ = worker.train(shared, own or None, rows, {"server-round": 2, "nodes": 3})
        assert set(again) == set(shared)


def test_auto_precision_is_what_the_device_runs_natively():
    device = pick_device()
    assert resolve_precision("auto", device) == ("bf16" if native_bf16(device) else "fp32")
    assert resolve_precision("fp32", device) == "fp32"


@needs_cuda
def test_cyclegan_translation_on_the_gpu_matches_the_cpu():
    from harmonize.translators.cyclegan.networks import ResnetGenerator, init_weights
    from harmonize.translators.cyclegan.translator import CycleGANTranslator

    torch.manual_seed(0)
    g = init_weights(ResnetGenerator(ngf=8, n_blocks=2))
    x = np.random.default_rng(0).random((300, 260)).astype(np.float32)
    out = {}
    for device in ("cpu", "cuda"):
        t = CycleGANTranslator(ngf=8, n_blocks=2, tile_size=128, precision="fp32",
                               polarity="keep", device=device)
        t.set_trained(g, np.zeros((32, 32), np.float32), "ref")
        out[device] = t.transform([x])[0]
    np.testing.assert_allclose(out["cuda"], out["cpu"], atol=5e-3)  # TF32 convolutions


@needs_cuda
def test_classifier_inference_and_gradcam_run_on_the_gpu():
    from harmonize.classify.networks import Classifier
    from harmonize.classify.train import predict
    from harmonize.evaluation.audit import gradcam_maps

    torch.manual_seed(0)
    model = Classifier("cnn", 32, width=4, norm="batch").eval()
    x = torch.rand(10, 1, 32, 32)
    with torch.no_grad():
        expected = torch.sigmoid(model(x).float()).numpy()
    np.testing.assert_allclose(predict(model, x), expected, atol=2e-3)  # on the GPU
    assert next(model.parameters()).device.type == "cpu"  # handed back where it was
    maps = gradcam_maps(model, x)
    assert maps.shape == (10, 32, 32) and np.isfinite(maps).all()


@needs_cuda
def test_a_short_cyclegan_training_runs_on_the_gpu(synth3, tmp_path):
    import json

    from harmonize.translators.cyclegan import load_config, train_cyclegan

    config = load_config(CONFIGS / "cyclegan/quick.yaml", {
        "data.manifest": synth3 / "manifest.csv", "data.reference_site": "site_a",
        "data.image_size": 32, "model.ngf": 8, "model.n_blocks": 1, "model.ndf": 8,
        "train.out": tmp_path / "run", "train.steps": 6, "train.log_every": 3,
        "train.progress": False})
    model = train_cyclegan(config)
    meta = json.loads((model / "metadata.json").read_text())
    assert meta["steps"] == 6
    log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert len(log) == 3 and "nan" not in log[-1]
