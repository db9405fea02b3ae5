"""Patient-level DP-SGD (privacy.mode patient-dp): clipping per patient (not per image),
noise calibrated to the target epsilon, refusal of unreachable targets, and the three
tasks training privately at a node."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from harmonize.cli import main
from harmonize.configs import ConfigError
from harmonize.data.manifest import load_manifest
from harmonize.federated.config import FederatedConfig, PrivacyConfig
from harmonize.federated.patient_dp import (
    PatientClipper,
    PatientDPPlan,
    PatientSampler,
    accountant_epsilon,
    patient_index,
    per_sample,
    plan_patient_dp,
)
from harmonize.federated.privacy import gaussian_epsilon

ROOT = Path(__file__).resolve().parents[1]


def private(**kw) -> PrivacyConfig:
    return PrivacyConfig(mode="patient-dp", **{"epsilon": 10.0, "delta": 1e-5, **kw})


def test_sigma_is_calibrated_to_the_target_with_opacus_accountant():
    plan = plan_patient_dp(100, 200, private(), patients_per_step=10)
    assert plan.sample_rate == pytest.approx(0.1)
    assert plan.epsilon() == pytest.approx(10.0, rel=0.01) and plan.epsilon() <= 10.0
    # half the steps spend less; a stricter target needs more noise
    assert plan.epsilon(100) < plan.epsilon()
    assert plan_patient_dp(100, 200, private(epsilon=3.0), 10).noise_multiplier > \
        plan.noise_multiplier
    # two gradients released per step from the same sample: sigma grows by sqrt(2)
    two = plan_patient_dp(100, 200, private(), 10, releases_per_step=2)
    assert two.noise_multiplier == pytest.approx(plan.noise_multiplier * math.sqrt(2), rel=1e-6)
    assert two.epsilon() == pytest.approx(plan.epsilon(), rel=1e-6)
    # without subsampling, opacus' accountant agrees with the closed form of privacy.py
    assert accountant_epsilon(1.5, 1.0, 30, 1e-5) == pytest.approx(
        gaussian_epsilon(1.5, 30, 1e-5), rel=1e-6)
    # subsampling amplifies: q = 0.1 spends far less than q = 1 at the same sigma
    assert accountant_epsilon(1.5, 0.1, 30, 1e-5) < 0.3 * gaussian_epsilon(1.5, 30, 1e-5)


def test_unreachable_targets_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"delta .* not below 1 / patients"):
        plan_patient_dp(50, 100, private(delta=0.05), 10)
    with pytest.raises(ConfigError, match="exceeds its 8 training patients"):
        plan_patient_dp(8, 100, private(), 10, node="site_b")
    with pytest.raises(ConfigError, match=r"epsilon 1 per patient cannot be met.*"
                                          "largest allowed noise multiplier 2"):
        plan_patient_dp(20, 5000, private(epsilon=1.0, max_noise_multiplier=2.0), 20)
    with pytest.raises(ValueError, match="give the target epsilon"):
        PrivacyConfig(mode="patient-dp")
    with pytest.raises(ValueError, match="separate modes"):
        PrivacyConfig(mode="patient-dp", epsilon=10, dp="server-fixed")
    assert PrivacyConfig(dp="server-fixed").mode == "node-dp"  # older configs


def test_classifier_settings_that_break_the_bound_are_refused(synth3):
    from harmonize.federated.classifier_task import ClassifierTask

    rows = load_manifest(synth3 / "manifest.csv").head(10)
    for classifier, message in (({}, "balance: none"),  # weighted-loss is the default
                                ({"balance": "none", "augment": True}, "augment: false"),
                                ({"balance": "none", "model": {"arch": "vit"}},
                                 "arch vit is not supported")):
        cfg = FederatedConfig(task="classifier", classifier=classifier,
                              privacy={"mode": "patient-dp", "epsilon": 10})
        with pytest.raises(ValueError, match=message):
            ClassifierTask(cfg).dp_plan(rows, "site_a")


def test_noise_is_not_reproducible_from_the_config_and_metrics_stay_private():
    """The server sets the seed: noise drawn from it could be subtracted again."""
    from harmonize.federated.patient_dp import public_metrics

    plan = PatientDPPlan(10, 0.5, 1, 1, 1.0, 1.0, 1e-5, 1.0)
    draws = []
    for _ in range(2):
        torch.manual_seed(0)  # as a task seeds torch from config.seed
        w = torch.nn.Parameter(torch.zeros(1000))
        PatientClipper([w], plan).privatize(None, 0)  # an empty sample: noise alone
        draws.append(w.grad.clone())
        assert float(w.grad.std()) == pytest.approx(1.0 * 1.0 / 5.0, rel=0.1)  # sigma C / qP
    assert not torch.equal(draws[0], draws[1])
    s1 = PatientSampler(np.arange(50), 0.5)
    s2 = PatientSampler(np.arange(50), 0.5)
    assert [tuple(s1.sample()[0]) for _ in range(3)] != [tuple(s2.sample()[0]) for _ in range(3)]
    sent = public_metrics({"train_loss": 0.3, "num-examples": 57, "compute_seconds": 2.0,
                           "epsilon": 1.2, "update_norm": 3.0},
                          PrivacyConfig(mode="patient-dp", epsilon=10))
    assert sent == {"epsilon": 1.2, "update_norm": 3.0, "num-examples": 1}


def test_patients_are_sampled_whole():
    rows = pd.DataFrame({"patient_id": ["p1", "p1", "p2", "p3", "p3", "p3"]})
    patient_of_row, how = patient_index(rows)
    assert how == "patient_id column" and list(patient_of_row) == [0, 0, 1, 2, 2, 2]
    assert patient_index(rows.drop(columns="patient_id"))[1].startswith("one patient per image")
    sampler = PatientSampler(patient_of_row, 0.5, seed=0)
    drawn = []
    for _ in range(400):
        idx, local, n = sampler.sample()
        picked = set(patient_of_row[idx])
        assert len(picked) == n and len(set(local)) == n
        for p in picked:  # all of a drawn patient's images, none of the others'
            assert set(idx) >= set(np.flatnonzero(patient_of_row == p))
        drawn.append(n)
    assert np.mean(drawn) == pytest.approx(1.5, abs=0.15)  # Poisson: q x patients
    assert 0 in drawn  # empty steps happen and are allowed


def test_each_patient_is_clipped_as_a_whole_then_averaged():
    """Without noise, the privatized gradient is sum_p clip(sum of p's image gradients)
    / expected patients, computed here by one backward pass per patient."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.GroupNorm(1, 3),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 36, 1))
    x, y = torch.randn(5, 1, 8, 8) * 3, torch.randn(5, 1)
    row_patient = torch.tensor([0, 0, 1, 2, 2])  # 3 patients, two with 2 images
    clip = 0.5
    expected = []
    for p in range(3):
        net.zero_grad()
        rows = row_patient == p
        # the mean loss over the batch has per-image gradients grad(l_i); a patient's
        # gradient is their sum
        (torch.nn.functional.mse_loss(net(x[rows]), y[rows], reduction="sum")).backward()
        g = torch.cat([q.grad.flatten() for q in net.parameters()])
        expected.append(g * min(1.0, clip / float(g.norm())))
    assert all(float(e.norm()) == pytest.approx(clip, rel=1e-4) for e in expected)  # clipped
    plan = PatientDPPlan(patients=6, sample_rate=0.5, steps=1, releases_per_step=1,
                         noise_multiplier=0.0, max_grad_norm=clip, delta=1e-5,
                         target_epsilon=1.0)
    clipper = PatientClipper(list(net.parameters()), plan, seed=0)
    wrapped = per_sample(net)
    net.zero_grad()
    torch.nn.functional.mse_loss(wrapped(x), y).backward()
    clipper.privatize(row_patient, 3)
    got = torch.cat([q.grad.flatten() for q in net.parameters()])
    torch.testing.assert_close(got, torch.stack(expected).sum(0) / 3.0, rtol=1e-4, atol=1e-6)
    # with noise: the estimate moves by sigma * clip / expected patients per coordinate
    noisy = PatientClipper(list(net.parameters()), PatientDPPlan(
        6, 0.5, 1, 1, 2.0, clip, 1e-5, 1.0), seed=1)
    net.zero_grad()
    torch.nn.functional.mse_loss(wrapped(x), y).backward()
    noisy.privatize(row_patient, 3)
    noise = torch.cat([q.grad.flatten() for q in net.parameters()]) - got
    assert float(noise.std()) == pytest.approx(2.0 * clip / 3.0, rel=0.25)


def test_federated_classifier_with_patient_dp(synth3, tmp_path, capsys):
    config = {"task": "classifier", "rounds": 2, "threads_per_node": 1,
              "classifier": {"model": {"arch": "cnn", "width": 4, "norm": "batch"},
                             "image_size": 32, "batch_size": 8, "balance": "none"},
              "privacy": {"mode": "patient-dp", "epsilon": 8.0, "delta": 1e-3}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["federated", "-q", "--config", str(tmp_path / "c.yaml"), "--data",
                 str(synth3 / "manifest.csv"), "--out", str(out)]) == 0
    assert "per patient at delta 0.001" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon_unit"] == "patient" and summary["privacy"] == "patient-dp"
    assert 7.5 < summary["epsilon"] <= 8.0
    assert set(summary["epsilon_per_node"]) == {"site_a", "site_b", "site_c"}
    plan = summary["patient_dp"]["site_a"]
    assert plan["patients"] == 12 and plan["noise_multiplier"] > 0  # 25% held out
    assert plan["patients_from"] == "patient_id column"
    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds["epsilon_site_b"].is_monotonic_increasing
    # the nodes sent no loss and no example count: nothing computed from data unnoised
    assert not any(c.startswith("train_loss") for c in rounds.columns)
    assert "train_update_norm" in rounds  # a norm of the noisy update: post-processing
    assert rounds["epsilon"].iloc[-1] == pytest.approx(summary["epsilon"])
    # BatchNorm was replaced by GroupNorm (checkpoint loads as such)
    from harmonize.classify.train import load_classifier

    model, cfg, _ = load_classifier(out / "model")
    assert cfg["norm"] == "group"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_an_unreachable_target_stops_the_run_before_it_starts(synth3, tmp_path, capsys):
    config = {"task": "classifier", "rounds": 50, "threads_per_node": 1,
              "classifier": {"model": {"arch": "cnn", "width": 4}, "image_size": 32,
                             "balance": "none"},
              "privacy": {"mode": "patient-dp", "epsilon": 0.5, "delta": 1e-3,
                          "max_noise_multiplier": 3}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["federated", "-q", "--config", str(tmp_path / "c.yaml"), "--data",
                 str(synth3 / "manifest.csv"), "--out", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err
    assert "node 'site_a': epsilon 0.5 per patient cannot be met" in err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_cyclegan_node_trains_all_four_networks_privately(synth3):
    from harmonize.federated.cyclegan_task import NETS, CycleGANTask

    cfg = FederatedConfig(
        task="cyclegan", reference_site="site_a", rounds=4, manifest=synth3 / "manifest.csv",
        privacy={"mode": "patient-dp", "epsilon": 10.0, "delta": 1e-3,
                 "patients_per_step": 4},
        cyclegan={"config": ROOT / "configs/cyclegan/quick.yaml",
                  "sites": ["site_b", "site_c"], "local_steps": 2,
                  "set": {"data.image_size": 32, "model.ngf": 8, "model.n_blocks": 1,
                          "model.ndf": 8, "train.mixed_precision": "no"}})
    task = CycleGANTask(cfg)
    df = load_manifest(synth3 / "manifest.csv")
    arrays = task.initial_arrays()
    for site in ("site_a", "site_b"):  # the reference node, a source node
        rows = df[df["site"] == site].reset_index(drop=True)
        sent, _, metrics = task.train(arrays, None, rows, {"server-round": 1, "nodes": 3})
        for net in NETS:  # every network's update is a noisy gradient
            moved = [k for k in arrays if k.startswith(f"{net}.")
                     and arrays[k].is_floating_point() and not torch.equal(sent[k], arrays[k])]
            assert moved, net
        plan = task.dp_plan(rows, site)[0]
        assert plan.releases_per_step == 2 and plan.steps == 8  # 4 rounds x K = 2
        assert metrics["epsilon"] == pytest.approx(plan.epsilon(2))
        assert metrics["epsilon"] < plan.epsilon()
        assert math.isfinite(metrics["loss_g"])


def test_only_the_reference_prior_trains_privately(synth3, tmp_path):
    from harmonize.federated.local_prior_task import LocalPriorTask

    cfg = FederatedConfig(
        task="diffusion", reference_site="site_a", rounds=1, out=tmp_path,
        manifest=synth3 / "manifest.csv",
        privacy={"mode": "patient-dp", "epsilon": 10.0, "delta": 1e-3},
        diffusion={"config": ROOT / "configs/diffusion/quick.yaml", "prior": "local",
                   "local_steps": 3, "set": {"data.image_size": 32, "train.batch_size": 4}})
    task = LocalPriorTask(cfg)
    df = load_manifest(synth3 / "manifest.csv")
    ref = df[df["site"] == "site_a"].assign(node="site_a").reset_index(drop=True)
    other = df[df["site"] == "site_b"].assign(node="site_b").reset_index(drop=True)
    assert task.dp_plan(other, "site_b") is None  # its prior never leaves: no DP needed
    plan = task.dp_plan(ref, "site_a")[0]
    assert plan.steps == 3 and plan.patients == 16
    sent, _, metrics = task.train({}, None, ref, {"server-round": 1})
    assert sent and metrics["is_reference"] == 1.0
    assert metrics["epsilon"] == pytest.approx(plan.epsilon()) and plan.epsilon() <= 10.0
    model = tmp_path / "nodes" / "site_a" / "prior_site_a" / "run" / "model"
    meta = json.loads((model / "metadata.json").read_text())
    assert meta["federated"]["patient_dp"]["epsilon"] == pytest.approx(plan.epsilon())


def test_shared_prior_node_trains_privately(synth3):
    from harmonize.federated.diffusion_task import DiffusionTask

    cfg = FederatedConfig(
        task="diffusion", reference_site="site_a", rounds=3, manifest=synth3 / "manifest.csv",
        privacy={"mode": "patient-dp", "epsilon": 10.0, "delta": 1e-3},
        diffusion={"config": ROOT / "configs/diffusion/quick.yaml", "local_steps": 2,
                   "sites": ["site_a", "site_b", "site_c"],
                   "set": {"data.image_size": 32, "train.batch_size": 4}})
    task = DiffusionTask(cfg)
    rows = load_manifest(synth3 / "manifest.csv")
    rows = rows[rows["site"] == "site_b"].assign(node="site_b").reset_index(drop=True)
    arrays = task.initial_arrays()
    sent, _, metrics = task.train(arrays, None, rows, {"server-round": 2, "nodes": 3})
    plan = task.dp_plan(rows, "site_b")[0]
    assert plan.steps == 6  # 3 rounds x 2 local steps
    assert metrics["epsilon"] == pytest.approx(plan.epsilon(4))  # after round 2 of 3
    assert any(not torch.equal(sent[k], arrays[k]) for k in arrays)


def test_federated_histogram_matching_releases_the_central_landmarks(synth3, tmp_path):
    """Without DP the released landmarks are central histogram matching's; with DP they
    are noised once, epsilon per patient as asked, and still map images."""
    from harmonize.fit import model_space_images
    from harmonize.translators import HistogramMatching, load_translator

    df = load_manifest(synth3 / "manifest.csv")
    runs = {}
    for name, extra in (("plain", []), ("dp", ["--set", "privacy.mode=patient-dp", "--set",
                                               "privacy.epsilon=10", "--set",
                                               "privacy.delta=1e-3"])):
        out = tmp_path / name
        assert main(["federated", "-q", "--config", str(ROOT / "configs/federated/histogram.yaml"),
                     "--data", str(synth3 / "manifest.csv"), "--reference-site", "site_a",
                     "--out", str(out), *extra]) == 0
        runs[name] = json.loads((out / "summary.json").read_text())
        runs[name]["translator"] = load_translator(out / "model")
    ref = df[df["site"] == "site_a"]
    plain, dp = runs["plain"]["translator"], runs["dp"]["translator"]
    assert plain.n_quantiles == 8  # the config's landmarks
    central = HistogramMatching(n_quantiles=8).fit(
        model_space_images(ref, plain.policy, progress=False), "site_a")
    np.testing.assert_allclose(plain.reference_quantiles_, central.reference_quantiles_,
                               atol=1e-6)
    assert runs["plain"]["epsilon"] is None
    assert runs["dp"]["epsilon"] == pytest.approx(10.0, rel=0.01)
    assert runs["dp"]["patient_dp"]["site_a"]["sample_rate"] == 1.0  # one release, all
    moved = np.abs(dp.reference_quantiles_ - plain.reference_quantiles_)
    assert 0 < moved.max() < 0.5 and np.all(np.diff(dp.reference_quantiles_) >= 0)
    images = [x for x, _ in model_space_images(df[df["site"] == "site_b"].head(4),
                                               plain.policy, progress=False)]
    out_plain = plain.transform(images, ["site_b"] * 4)
    out_dp = dp.transform(images, ["site_b"] * 4)
    for a, b in zip(out_plain, out_dp, strict=True):
        assert a.shape == b.shape and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


def test_cyclegan_per_image_gradients_add_up_to_the_batch_gradient(synth3):
    """No noise, no clipping: the privatized generator and discriminator gradients are
    the plain batch gradients (per-image gradients through G -> F and G -> D_B are right)."""
    from harmonize.federated import patient_dp
    from harmonize.federated.cyclegan_task import (
        CycleGANTask,
        Nets,
        discriminator_objective,
        generator_objective,
    )
    from harmonize.translators.cyclegan import losses
    from harmonize.translators.cyclegan.networks import ImagePool

    cfg = FederatedConfig(
        task="cyclegan", reference_site="site_a", rounds=1, manifest=synth3 / "manifest.csv",
        cyclegan={"config": ROOT / "configs/cyclegan/quick.yaml", "sites": ["site_b", "site_c"],
                  "set": {"data.image_size": 32, "model.ngf": 8, "model.n_blocks": 1,
                          "model.ndf": 8, "train.mixed_precision": "no"}})
    task = CycleGANTask(cfg)
    df = load_manifest(synth3 / "manifest.csv")
    w = losses.LossWeights.from_config(task.cg.loss)
    for site in ("site_b", "site_a"):  # a source node, the reference node
        rows = df[df["site"] == site].reset_index(drop=True)
        data = task.node_data(rows, "cpu")
        batch = task.private_batch(data, np.arange(5), np.random.default_rng(0), None)
        torch.manual_seed(0)
        nets = task.nets()
        plain = {}
        loss_g, fake_b, fake_a = generator_objective(nets, batch, w)
        gen = nets.generators()
        plain["g"] = torch.autograd.grad(loss_g, gen)
        loss_d = discriminator_objective(nets, batch, fake_b, fake_a, ImagePool(0), ImagePool(0))
        plain["d"] = torch.autograd.grad(loss_d, nets.discriminators())
        plan = PatientDPPlan(5, 1.0, 1, 1, 0.0, 1e9, 1e-5, 1.0)  # E = 5 = the batch
        for part, params in (("g", gen), ("d", nets.discriminators())):
            frozen = nets.discriminators() if part == "g" else gen
            for p in frozen:
                p.requires_grad_(False)
            clipper = patient_dp.PatientClipper(params, plan, seed=0)
            with patient_dp.private_gradients(nets.g, nets.f, nets.d_a, nets.d_b) as wrapped:
                private = Nets(*wrapped)
                if part == "g":
                    for d in (private.d_a, private.d_b):
                        d.disable_hooks()
                    loss, _, _ = generator_objective(private, batch, w)
                else:
                    fakes = [None if f is None else f.detach() for f in (fake_b, fake_a)]
                    loss = discriminator_objective(private, batch, *fakes, ImagePool(0),
                                                   ImagePool(0))
                for p in params:
                    p.grad = None
                loss.backward()
                clipper.privatize(torch.arange(5), 5)
            for p in frozen:
                p.requires_grad_(True)
            scale = max(float(g.abs().max()) for g in plain[part])
            for p, g in zip(params, plain[part], strict=True):  # fp32, relative to the step
                torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-4 * scale)


def test_opacus_is_the_tested_range_with_the_internals_we_use():
    """patient_dp.py goes below Opacus' public API: it sets `RDPAccountant.history`,
    writes `p.grad_sample` and calls `DPOptimizer.pre_step`, and removes the hooks with
    `GradSampleModule._close`. pyproject pins the Opacus range this file passes on; an
    upgrade past it fails here first, saying what to re-check."""
    import tomllib

    import opacus
    from opacus.accountants import RDPAccountant
    from packaging.specifiers import SpecifierSet

    pins = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            ["dependencies"] if d.startswith("opacus")]
    assert len(pins) == 1 and "<" in pins[0], "pin opacus to a tested range in pyproject"
    assert opacus.__version__ in SpecifierSet(pins[0].removeprefix("opacus")), (
        f"opacus {opacus.__version__} is outside the tested range {pins[0]}: run "
        "tests/test_patient_dp.py with it, then widen the pin")
    # the accountant with its history set equals step-by-step accounting
    steps = RDPAccountant()
    for _ in range(30):
        steps.step(noise_multiplier=1.5, sample_rate=0.1)
    assert accountant_epsilon(1.5, 0.1, 30, 1e-5) == pytest.approx(steps.get_epsilon(1e-5))
    # per-image gradients land in p.grad_sample; afterwards the module is plain again
    from harmonize.federated.patient_dp import private_gradients

    net = torch.nn.Linear(3, 1)
    with private_gradients(net) as wrapped:
        wrapped(torch.randn(4, 3)).sum().backward()
        assert net.weight.grad_sample.shape == (4, 1, 3)
    net.weight.grad_sample = None
    net(torch.randn(4, 3)).sum().backward()
    assert net.weight.grad_sample is None and not net._forward_hooks and not net._backward_hooks
