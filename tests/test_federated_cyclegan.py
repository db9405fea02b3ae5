"""The federated CycleGAN decomposes the central objective exactly: the nodes' gradients
sum to the central gradient, and at K = 1 a round (node steps, FedAvg's mean, the
server's Adam) is one central Adam step."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from harmonize.data.manifest import load_manifest
from harmonize.federated.config import FederatedConfig
from harmonize.federated.cyclegan_task import (
    CycleGANTask,
    NodeBatch,
    discriminator_objective,
    generator_objective,
    half_weights,
)
from harmonize.federated.server_optimizer import ServerOptimizer
from harmonize.synth import generate
from harmonize.translators.cyclegan import losses
from harmonize.translators.cyclegan.networks import ImagePool

ROOT = Path(__file__).resolve().parents[1]
SITES = ["site_a", "site_b", "site_c", "site_d"]  # site_a is the reference


@pytest.fixture(scope="module")
def synth4(tmp_path_factory):
    out = tmp_path_factory.mktemp("fedcg") / "synth"
    generate(out, sites=4, per_site=4, size=32, seed=0, progress=False)
    return out


TINY_SET = {"data.image_size": 32, "model.ngf": 8, "model.n_blocks": 1, "model.ndf": 8,
            "train.batch_size": 2, "loss.pool_size": 0, "train.mixed_precision": "no"}


def make_task(synth4, **cyclegan) -> CycleGANTask:
    cfg = FederatedConfig(
        task="cyclegan", reference_site="site_a", rounds=10,
        manifest=synth4 / "manifest.csv",
        cyclegan={"config": ROOT / "configs/cyclegan/quick.yaml", "sites": SITES[1:],
                  "set": TINY_SET, **cyclegan})
    return CycleGANTask(cfg)


def node_batches(task, synth4, settings) -> list[tuple]:
    """(rows, NodeBatch) of each node's first step, as its train() draws it."""
    df = load_manifest(synth4 / "manifest.csv")
    out = []
    for site in SITES:
        rows = df[df["site"] == site].reset_index(drop=True)
        data = task.node_data(rows, "cpu")
        counts = [0 if data[0] is None else len(data[0]), 0 if data[2] is None else len(data[2])]
        seed = [task.config.seed, zlib.crc32(site.encode())]
        out.append((rows, task.node_batch(data, 0, seed, half_weights(settings, *counts),
                                          settings.get("count.sites"))))
    return out


def central_batch(batches: list[NodeBatch]) -> NodeBatch:
    """All nodes' images in one batch: what central training sees in one step."""
    src = [b for b in batches if b.a is not None]
    ref = next(b for b in batches if b.b is not None)
    return NodeBatch(a=torch.cat([b.a for b in src]), a_cond=torch.cat([b.a_cond for b in src]),
                     b=ref.b, b_cond=ref.b_cond, source_weight=1.0, reference_weight=1.0)


def gradients(task, arrays, batch: NodeBatch) -> dict[str, torch.Tensor]:
    """Gradients of one step: the generators' at the start weights, then the
    discriminators' on the (pre-update) translations, as central training takes them."""
    nets = task.nets(arrays)
    w = losses.LossWeights.from_config(task.cg.loss)
    for p in nets.discriminators():
        p.requires_grad_(False)
    loss_g, fake_b, fake_a = generator_objective(nets, batch, w)
    loss_g.backward()
    for p in nets.discriminators():
        p.requires_grad_(True)
    discriminator_objective(nets, batch, fake_b, fake_a, ImagePool(0), ImagePool(0)).backward()
    return {f"{name}.{k}": (torch.zeros_like(p) if p.grad is None else p.grad)
            for name in ("g", "f", "d_a", "d_b")
            for k, p in getattr(nets, name).named_parameters()}


def test_node_gradients_sum_to_the_central_gradient(synth4):
    task = make_task(synth4)
    arrays = task.initial_arrays()
    settings = {"nodes": 4, **task.server_settings()}
    assert settings["count.source"] == 12 and settings["count.reference"] == 4
    assert settings["count.sites"] == [4, 4, 4]  # per source site, in condition order
    batches = [b for _, b in node_batches(task, synth4, settings)]
    assert [(b.source_weight, b.reference_weight) for b in batches] == [
        (0.0, 1.0), *[(pytest.approx(1 / 3), 0.0)] * 3]
    central = gradients(task, arrays, central_batch(batches))
    per_node = [gradients(task, arrays, b) for b in batches]
    # biases in front of an instance norm have no gradient but rounding noise: the
    # tolerance is relative to the largest gradient of all
    scale = max(float(g.abs().max()) for g in central.values())
    for key, g in central.items():
        summed = sum(node[key] for node in per_node)
        assert torch.allclose(summed, g, rtol=1e-4, atol=1e-6 * scale), key
    # every node contributes: dropping the reference node's terms changes G's gradient
    without_ref = sum(node["g.head.1.weight"] for node in per_node[1:])
    assert not torch.allclose(without_ref, central["g.head.1.weight"], atol=1e-3)


def test_one_round_at_k1_is_one_central_adam_step(synth4):
    task = make_task(synth4)  # the default local_lr: nodes send gradients, not lr-steps
    arrays = task.initial_arrays()
    settings = {"server-round": 1, "nodes": 4, **task.server_settings()}
    pairs = node_batches(task, synth4, settings)
    replies = [task.train(arrays, None, rows, settings)[0] for rows, _ in pairs]
    mean = {k: sum(r[k] for r in replies) / len(replies) for k in arrays}  # FedAvg, equal
    new = ServerOptimizer(task.server_optimizer(), arrays).step(1, mean, len(replies))

    grads = gradients(task, arrays, central_batch([b for _, b in pairs]))
    central = {k: torch.nn.Parameter(v.clone()) for k, v in arrays.items() if k in grads}
    for k, p in central.items():
        p.grad = grads[k]
    tc = task.cg.train
    torch.optim.Adam(central.values(), lr=tc.lr, betas=(tc.beta1, tc.beta2)).step()

    x = central_batch([b for _, b in pairs]).a
    with torch.no_grad():
        g_fed = task.nets(new).g.eval()(x)
        g_central = task.nets({**arrays, **central}).g.eval()(x)
        g_start = task.nets(arrays).g.eval()(x)
    moved = float((g_central - g_start).abs().max())
    assert moved > 0.1  # the step did something
    assert float((g_fed - g_central).abs().max()) < 1e-5 * moved


def test_more_local_steps_drift_from_the_central_step(synth4):
    """K = 5 local SGD steps are not 5 central steps: the nodes' updates are taken at
    different weights, so the round differs from K = 1's exact step."""
    task = make_task(synth4, local_steps=5)
    arrays = task.initial_arrays()
    settings = {"server-round": 1, "nodes": 4, **task.server_settings()}
    df = load_manifest(synth4 / "manifest.csv")
    shared, own, metrics = task.train(arrays, None, df[df["site"] == "site_b"], settings)
    assert set(shared) == set(arrays) and not own  # pool size 0: nothing kept
    changed = [k for k in arrays if not torch.equal(shared[k], arrays[k])]
    assert any(k.startswith("g.") for k in changed) and any(k.startswith("d_b.") for k in changed)
    # a source node has no reference images: D_B's real term and F_gan are not its own,
    # but D_A's real term on site_b is
    assert any(k.startswith("d_a.") for k in changed)


def test_nodes_train_on_crops_at_the_native_scale_as_central_training(synth4):
    """32 px images, 16 px crops: a node holds its images at their native 32 px (not
    resized to 16) and crops them per step, so G learns at the scale it is applied at."""
    task = make_task(synth4, set={"data.image_size": 16, "model.ngf": 8, "model.n_blocks": 1,
                                  "model.ndf": 8, "model.n_layers_d": 1, "train.batch_size": 2,
                                  "loss.pool_size": 0, "train.mixed_precision": "no"})
    df = load_manifest(synth4 / "manifest.csv")
    data = task.node_data(df[df["site"] == "site_b"].reset_index(drop=True), "cpu")
    assert data[0].shape[-2:] == (32, 32)
    batch = task.node_batch(data, 0, [0, 1], (1.0, 0.0))
    assert batch.a.shape == (2, 1, 16, 16)
    full = data[0]
    assert any(torch.equal(batch.a[0, 0], full[k, 0, i:i + 16, j:j + 16])
               for k in range(len(full)) for i in range(17) for j in range(17))


def test_the_reference_node_renders_each_site_in_proportion_to_its_size():
    from harmonize.federated.cyclegan_task import condition_plan

    assert condition_plan([4, 4, 4], 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert condition_plan([10, 5, 1], 6).tolist() == [0, 0, 0, 0, 1, 1]
    assert len(condition_plan([3, 1], 5)) == 5


@pytest.fixture(scope="module")
def landmarks(synth4, tmp_path_factory):
    """Reference landmarks released before the run (here fitted centrally; in a deployment
    the federated histogram task's model)."""
    from harmonize.fit import fit_and_save
    from harmonize.translators import HistogramMatching

    out = tmp_path_factory.mktemp("landmarks") / "hm"
    df = load_manifest(synth4 / "manifest.csv")
    fit_and_save(HistogramMatching(n_quantiles=8, polarity="keep"), df,
                 synth4 / "manifest.csv", "site_a", out, progress=False)
    return out


def test_federated_histogram_residual_maps_at_the_node_and_starts_at_the_landmarks(
        synth4, landmarks, tmp_path):
    import numpy as np

    from harmonize.translators import HistogramMatching, load_translator

    task = make_task(synth4, config=ROOT / "configs/histogram_residual/quick.yaml",
                     set={**TINY_SET, "landmarks.checkpoint": str(landmarks)})
    hm = HistogramMatching.load(landmarks)
    df = load_manifest(synth4 / "manifest.csv")
    rows = df[df["site"] == "site_b"].reset_index(drop=True)
    xa, _, xb = task.node_data(rows, "cpu")
    raw = task._images(rows)  # what a plain CycleGAN node trains on
    expected = hm.transform([(r[0].numpy() + 1) / 2 for r in raw], ["site_b"] * len(raw))
    assert xb is None and torch.allclose(xa[:, 0], torch.from_numpy(np.stack(expected)) * 2 - 1,
                                         atol=1e-6)
    # the untrained global model is exactly histogram matching onto the released landmarks
    path = task.save(task.initial_arrays(), tmp_path / "model", {})
    t = load_translator(path)
    assert t.kind == "histogram-residual"
    images = [(r[0].numpy() + 1) / 2 for r in raw]
    for got, want in zip(t.transform(images, ["site_b"] * len(images)),
                         hm.transform(images, ["site_b"] * len(images)), strict=True):
        np.testing.assert_allclose(got, np.clip(want, 0, 1), atol=1e-6)


def test_federated_histogram_residual_flips_an_inverted_site_like_central(
        synth4, landmarks, tmp_path):
    """site_c exports MONOCHROME1. The landmark release carries the reference mean image,
    so the federated translator guards polarity as central histogram matching does (it
    once kept the inverted grey scale: SSIM -0.33 against central's 0.88)."""
    import numpy as np

    from harmonize.translators import HistogramMatching, load_translator

    task = make_task(synth4, config=ROOT / "configs/histogram_residual/quick.yaml",
                     set={**TINY_SET, "landmarks.checkpoint": str(landmarks)})
    hm = HistogramMatching.load(landmarks).set_params(polarity="auto")
    df = load_manifest(synth4 / "manifest.csv")
    rows = df[df["site"] == "site_c"].reset_index(drop=True)
    images = [(r[0].numpy() + 1) / 2 for r in task._images(rows)]
    t = load_translator(task.save(task.initial_arrays(), tmp_path / "model", {}))
    got = t.transform(images, ["site_c"] * len(images))
    want = hm.transform(images, ["site_c"] * len(images))
    kept = HistogramMatching.load(landmarks).transform(images, ["site_c"] * len(images))
    assert not np.allclose(want[0], kept[0], atol=0.05)  # the guard does flip site_c
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, np.clip(w, 0, 1), atol=1e-6)


def test_federated_cyclegan_flips_an_inverted_site_with_a_released_template(
        synth4, landmarks, tmp_path):
    """With `cyclegan.template` (a histogram release) a source node trains on its
    inverted exports flipped, as central training's polarity guard does, and the global
    model flips them at apply time; without it neither happens."""
    import numpy as np

    from harmonize.data import polarity as pol
    from harmonize.translators import HistogramMatching, load_translator

    template = HistogramMatching.load(landmarks).template_
    df = load_manifest(synth4 / "manifest.csv")
    rows = df[df["site"] == "site_c"].reset_index(drop=True)
    plain, guarded = make_task(synth4), make_task(synth4, template=str(landmarks))
    raw = (plain.node_data(rows, "cpu")[0] + 1) / 2
    flipped = (guarded.node_data(rows, "cpu")[0] + 1) / 2
    assert all(pol.is_inverted(r[0].numpy(), template) for r in raw)  # site_c: MONOCHROME1
    torch.testing.assert_close(flipped, 1 - raw)
    t = load_translator(guarded.save(guarded.initial_arrays(), tmp_path / "model", {}))
    assert t.polarity == "auto" and np.allclose(t.template_, template)
    assert load_translator(plain.save(plain.initial_arrays(), tmp_path / "m2", {})).polarity \
        == "keep"


def test_federated_histogram_residual_needs_released_landmarks(synth4):
    from harmonize.configs import ConfigError

    with pytest.raises(ConfigError, match="configs/federated/histogram.yaml"):
        make_task(synth4, config=ROOT / "configs/histogram_residual/quick.yaml")


def test_a_nested_override_changes_one_key_not_the_section(synth4, landmarks):
    """`--set cyclegan.set.data.image_size=32` arrives nested; the rest of `data` stays."""
    task = make_task(synth4, config=ROOT / "configs/histogram_residual/quick.yaml",
                     set={**TINY_SET, "data": {"image_size": 32},
                          "landmarks": {"checkpoint": str(landmarks)}})
    assert task.cg.data.image_size == 32 and task.cg.data.fingerprints == "remove"
    assert task.landmarks.n_quantiles == 8


def test_federated_cut_node_gradients_sum_to_the_central_gradient(synth4):
    """CUT's terms split the same way: a source node's adversarial + PatchNCE terms and
    D_B's fake term, the reference node's identity PatchNCE and D_B's real term. Exact when
    PatchNCE uses every patch (a node draws its own patches otherwise: equal in
    expectation)."""
    from harmonize.federated.cut_task import CUTTask
    from harmonize.federated.tasks import build_task

    cfg = FederatedConfig(
        task="cyclegan", reference_site="site_a", rounds=10, manifest=synth4 / "manifest.csv",
        cyclegan={"config": ROOT / "configs/cut/quick.yaml", "sites": SITES[1:],
                  "set": {**TINY_SET, "loss.nce_patches": 4096}})
    task = build_task(cfg)
    assert isinstance(task, CUTTask) and task.nets().names() == ("g", "h", "d_b")
    arrays = task.initial_arrays()
    settings = {"nodes": 4, **task.server_settings()}
    batches = [b for _, b in node_batches(task, synth4, settings)]
    w = losses.LossWeights.from_config(task.cg.loss)

    def grads(batch):
        nets = task.nets(arrays)
        for p in nets.discriminators():
            p.requires_grad_(False)
        loss_g, fake_b, _ = task.generator_objective(nets, batch, w)
        loss_g.backward()
        for p in nets.discriminators():
            p.requires_grad_(True)
        task.discriminator_objective(nets, batch, fake_b, None, ImagePool(0),
                                     ImagePool(0)).backward()
        return {k: (torch.zeros_like(p) if p.grad is None else p.grad)
                for k, p in nets.named(nets.names())}

    central = grads(central_batch(batches))
    per_node = [grads(b) for b in batches]
    scale = max(float(g.abs().max()) for g in central.values())
    for key, g in central.items():
        summed = sum(node[key] for node in per_node)
        assert torch.allclose(summed, g, rtol=1e-4, atol=1e-5 * scale), key
    assert float(central["h.heads.0.0.weight"].abs().sum()) > 0  # PatchNCE trains H
