"""Patient-level DP (`privacy.mode: patient-dp`) in one place: the mechanism (DP-SGD
with per-patient clipping at a node, with Opacus; one Gaussian release of a patient sum
for the histogram landmarks), its calibration (the noise for a target epsilon, or the
reason it cannot be met), and its accounting (each node's spent budget per round, the
run's guarantee, the plans summary.json reports). The apps and tasks only call these.

Opacus internals used here (`RDPAccountant.history`, `p.grad_sample`,
`DPOptimizer.pre_step`, `GradSampleModule._close`) hold for the range pyproject.toml
pins; `tests/test_patient_dp.py` checks them and fails first on an upgrade past it.

What is protected: one patient, i.e. all images of one `patient_id` (an image is its own
patient when the manifest has no such column). Each DP-SGD step
1. samples patients, each independently with probability q = patients_per_step /
   patients at the node (Poisson sampling, as the accountant assumes), and takes all of
   their training images;
2. computes every image's gradient (Opacus' `GradSampleModule`; its functorch path,
   which matched per-image backward passes to fp32 precision on our networks where the
   hook path was off by up to 1% on diffusers' UNet), sums them per patient and clips
   each patient's gradient, over all parameters of the update, to `max_grad_norm` C;
3. adds Gaussian noise N(0, (sigma C)^2) and divides by the expected number of patients
   (Opacus' `DPOptimizer` does steps 3 and the clipping of step 2 on the per-patient rows).

sigma is calibrated with Opacus' RDP accountant so that all planned steps of the run
(rounds x steps per round; an update that releases two gradients per step, as a
CycleGAN's generator and discriminator updates, counts as one Gaussian release of the
two with sigma / sqrt(2)) stay within `epsilon` at `delta`. A node refuses to start
when the target cannot be met: delta not below 1 / patients (the guarantee would allow
leaking a patient outright), more patients per step than it has, or a noise multiplier
above `max_noise_multiplier` (the update would be mostly noise).

Everything after the noisy gradient is post-processing (optimizer, EMA, the federated
average, the translator's outputs), so epsilon holds for the weights that leave the node.
The noise and the patient draws come from the operating system's entropy, never from
the run's seed (the server sets it: it could recompute and subtract the noise), so runs
under DP do not repeat exactly. Under patient-dp a node sends no loss and no example
count (`client_app` keeps only the DP bookkeeping); the number of patients at a node is
treated as public (the sampling rate reveals it, as in Opacus). Outside the guarantee:
the nodes' evaluation metrics on their held-out patients (`evaluate: false` sends none)
and round timing.
"""

from __future__ import annotations

import contextlib
import functools
import math
import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from harmonize.configs import ConfigError

PATIENT_COLUMN = "patient_id"


def patient_index(rows: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Each row's patient as 0..P-1, and how patients were told apart (for the logs)."""
    if PATIENT_COLUMN in rows.columns and rows[PATIENT_COLUMN].notna().all():
        codes, _ = pd.factorize(rows[PATIENT_COLUMN].astype(str))
        return codes.astype(np.int64), "patient_id column"
    return np.arange(len(rows), dtype=np.int64), "one patient per image (no patient_id)"


@dataclass(frozen=True)
class PatientDPPlan:
    """The calibrated DP-SGD of one node for the whole run."""
    patients: int
    sample_rate: float  # q
    steps: int  # DP-SGD steps of the run at this node
    releases_per_step: int  # gradients released per step from the same sample
    noise_multiplier: float  # sigma of each release
    max_grad_norm: float
    delta: float
    target_epsilon: float

    @property
    def expected_patients(self) -> float:
        return self.sample_rate * self.patients

    def epsilon(self, steps_done: int | None = None) -> float:
        """epsilon per patient spent after `steps_done` steps (default: all)."""
        return accountant_epsilon(self.noise_multiplier / math.sqrt(self.releases_per_step),
                                  self.sample_rate, self.steps if steps_done is None
                                  else steps_done, self.delta)


@functools.lru_cache(maxsize=256)  # every round asks again for the same numbers
def accountant_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    if steps <= 0:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(sigma, sample_rate, steps)]
    with warnings.catch_warnings():  # opacus' note on its own order range, per call
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta))


def plan_patient_dp(patients: int, steps: int, privacy, patients_per_step: int,
                    releases_per_step: int = 1, node: str = "") -> PatientDPPlan:
    """Calibrate sigma for this node, or raise ConfigError with the reason."""
    where = f"node '{node}': " if node else ""
    if privacy.epsilon is None:
        raise ConfigError("privacy.epsilon: give the target epsilon per patient for "
                          "patient-dp (e.g. 10)")
    if privacy.delta >= 1.0 / patients:
        raise ConfigError(f"{where}privacy.delta {privacy.delta:g} is not below 1 / patients "
                          f"(1/{patients}): the guarantee would allow leaking a patient; "
                          f"set delta below {1.0 / patients:.2g}")
    if patients_per_step > patients:
        raise ConfigError(f"{where}privacy.patients_per_step {patients_per_step} exceeds its "
                          f"{patients} training patients; lower it")
    q = patients_per_step / patients
    sigma_cap = privacy.max_noise_multiplier / math.sqrt(releases_per_step)
    at_cap = accountant_epsilon(sigma_cap, q, steps, privacy.delta)
    if at_cap > privacy.epsilon:
        raise ConfigError(
            f"{where}epsilon {privacy.epsilon:g} per patient cannot be met: {steps} DP-SGD "
            f"steps at sampling rate {q:.3g} ({patients_per_step} of {patients} patients) "
            f"spend epsilon {at_cap:.3g} even at the largest allowed noise multiplier "
            f"{privacy.max_noise_multiplier:g}; train fewer rounds / local steps, sample "
            "fewer patients per step, or accept a larger epsilon")
    sigma_eff = _calibrated_sigma(privacy.epsilon, privacy.delta, q, steps)
    return PatientDPPlan(patients=patients, sample_rate=q, steps=steps,
                         releases_per_step=releases_per_step,
                         noise_multiplier=sigma_eff * math.sqrt(releases_per_step),
                         max_grad_norm=privacy.max_grad_norm, delta=privacy.delta,
                         target_epsilon=privacy.epsilon)


@functools.lru_cache(maxsize=64)
def _calibrated_sigma(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' search for the noise multiplier (~1 s; nodes plan again every round, so
    it is computed once per process)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # opacus warns about its own optimal-order search
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant="rdp", epsilon_tolerance=0.005))


def per_sample(module: torch.nn.Module):
    """The module wrapped for per-image gradients (functorch path, see the docstring);
    in-place activations are switched off (Opacus' backward hooks forbid them). Prefer
    `private_gradients`, which removes the hooks again."""
    from opacus import GradSampleModule

    for m in module.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return GradSampleModule(module, loss_reduction="mean", force_functorch=True)


@contextlib.contextmanager
def expected_hook_warnings():
    """Opacus' hooks warn when they fire on outputs whose input needs no gradient, which
    is expected here; silenced for the block only (the user's filters stay as they are)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


@contextlib.contextmanager
def private_gradients(*modules: torch.nn.Module):
    """The modules wrapped by `per_sample` for the duration of the block; the hooks are
    removed afterwards, also when training fails (the modules are plain again)."""
    wrapped = [per_sample(m) for m in modules]
    try:
        with expected_hook_warnings():
            yield wrapped[0] if len(wrapped) == 1 else wrapped
    finally:
        for w in wrapped:
            w._close()


def _entropy_seed() -> int:
    return secrets.randbits(63)


class PatientSampler:
    """Poisson sampling of patients: each step takes every image of each patient drawn
    with probability q (the batch size varies; it can be empty)."""

    def __init__(self, patient_of_row: np.ndarray, sample_rate: float, seed=None) -> None:
        """seed None (what the tasks use): the operating system's entropy."""
        self.patient_of_row = np.asarray(patient_of_row)
        self.patients = int(self.patient_of_row.max()) + 1 if len(self.patient_of_row) else 0
        self.rate = sample_rate
        self.rng = np.random.default_rng(_entropy_seed() if seed is None else seed)

    def sample(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(row indices, each row's patient numbered 0..m-1, m sampled patients)."""
        drawn = np.flatnonzero(self.rng.random(self.patients) < self.rate)
        rows = np.flatnonzero(np.isin(self.patient_of_row, drawn))
        _, local = np.unique(self.patient_of_row[rows], return_inverse=True)
        return rows, local.astype(np.int64), len(drawn)


class PatientClipper:
    """Turns the per-image gradients of one update's parameters into the noisy clipped
    mean of per-patient gradients, in `p.grad` (Opacus' DPOptimizer on per-patient rows)."""

    def __init__(self, params: list[torch.nn.Parameter], plan: PatientDPPlan,
                 seed: int | None = None) -> None:
        """seed None (what the tasks use): noise from the operating system's entropy;
        a seed only in tests."""
        from opacus.optimizers import DPOptimizer

        self.params = [p for p in params if p.requires_grad]
        # the optimizer proper steps outside (callers accumulate gradients first); this
        # one only clips, adds noise and scales
        holder = torch.optim.SGD(self.params, lr=0.0)
        device = self.params[0].device
        self.dp = DPOptimizer(holder, noise_multiplier=plan.noise_multiplier,
                              max_grad_norm=plan.max_grad_norm,
                              expected_batch_size=max(1, round(plan.expected_patients)),
                              loss_reduction="mean",
                              generator=torch.Generator(device=device).manual_seed(
                                  _entropy_seed() if seed is None else seed))
        self.dp.expected_batch_size = plan.expected_patients  # exact, not rounded

    def privatize(self, row_patient: torch.Tensor | None, n_patients: int) -> None:
        """Replace each parameter's gradient by its DP estimate. Call after backward of a
        mean loss over the sampled rows (row_patient: each row's patient, 0..n-1), or with
        row_patient None for an empty sample (the estimate is then noise alone)."""
        for p in self.params:
            rows = getattr(p, "grad_sample", None)
            if rows is None and row_patient is not None and p.grad is not None:
                raise RuntimeError(f"a parameter of shape {tuple(p.shape)} received a "
                                   "gradient but no per-image gradients: its module is "
                                   "not wrapped by per_sample")
            if row_patient is None or rows is None:  # empty sample, or unused parameter
                rows = p.new_zeros((n_patients, *p.shape))
            elif isinstance(rows, list):
                rows = torch.stack(rows).sum(0)
            if row_patient is not None and len(row_patient) != n_patients:
                rows = rows.new_zeros((n_patients, *p.shape)).index_add_(
                    0, row_patient.to(rows.device), rows)
            p.grad_sample = rows
        self.dp.pre_step()  # clip per patient, sum, add noise, divide by expected patients
        for p in self.params:
            p.grad_sample = None
            p.summed_grad = None


def node_plan(privacy, rows: pd.DataFrame, rounds: int, steps_per_round, default_batch: int,
              releases_per_step: int = 1, node: str = "") -> tuple[PatientDPPlan, np.ndarray]:
    """This node's plan from its training rows; `steps_per_round(patients, per_step)`
    gives the DP-SGD steps of one round. Also each row's patient (0..P-1)."""
    patient_of_row, _ = patient_index(rows)
    patients = int(patient_of_row.max()) + 1
    # a stated value is taken as it is (refused below when too large); the default is
    # the task's batch, at most every patient
    per_step = privacy.patients_per_step or min(default_batch, patients)
    steps = rounds * int(steps_per_round(patients, per_step))
    return (plan_patient_dp(patients, steps, privacy, per_step, releases_per_step, node),
            patient_of_row)


DP_METRICS = ("epsilon", "noise_multiplier", "sample_rate", "dp_steps")


def dp_metrics(plan: PatientDPPlan, steps_done: int) -> dict:
    """What a node reports each round (rounds.csv, summary.json): DP_METRICS."""
    return {"epsilon": plan.epsilon(steps_done), "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate, "dp_steps": float(steps_done)}


# what may leave a node under patient-dp besides the noisy weights: DP bookkeeping, the
# reference-node flag, and quantities of the weights themselves (post-processing)
PUBLIC_METRICS = (*DP_METRICS, "is_reference", "bytes_sent", "update_norm")


def public_metrics(metrics: dict, privacy) -> dict:
    """Under patient-dp: the metrics a node may send (no loss, no example count: equal
    weights, so the aggregate stays a function of the noisy updates); else all."""
    if privacy.mode != "patient-dp":
        return metrics
    return {**{k: v for k, v in metrics.items() if k in PUBLIC_METRICS}, "num-examples": 1}


def node_plans(task, train_rows: dict[str, pd.DataFrame], progress: bool = True) -> dict:
    """Every node's calibrated DP-SGD before anything starts, as summary.json reports it
    (a target that cannot be met is refused here, with the reason, not at round 1)."""
    plans = {}
    for node, train in train_rows.items():
        planned = task.dp_plan(train, node)
        if planned is None:  # e.g. a node whose weights never leave
            continue
        plan, _ = planned
        how = patient_index(train)[1]
        if how != "patient_id column" and progress:
            print(f"note: node '{node}': no patient_id column, so each image counts as its "
                  "own patient (epsilon per image); add patient_id for epsilon per patient")
        plans[node] = {"patients": plan.patients, "patients_from": how,
                       "sample_rate": plan.sample_rate,
                       "expected_patients_per_step": plan.expected_patients,
                       "steps": plan.steps, "noise_multiplier": plan.noise_multiplier,
                       "max_grad_norm": plan.max_grad_norm, "epsilon": plan.epsilon(),
                       "delta": plan.delta}
    return plans


def run_epsilon(log: dict, delta: float) -> dict:
    """The run's patient-level guarantee from the round log: each node's spent epsilon
    (its last report) and the largest, which is the run's."""
    per_node: dict[str, float] = {}
    for r in sorted(log):
        per_node.update(log[r].get("epsilon", {}))
    return {"epsilon": max(per_node.values()) if per_node else None,
            "epsilon_per_node": per_node, "epsilon_unit": "patient", "delta": delta}


def single_release_plan(rows: pd.DataFrame, privacy, max_norm: float, node: str = ""
                        ) -> tuple[PatientDPPlan, np.ndarray] | None:
    """(plan, patient of each row) for one Gaussian release of a sum over the patients of
    `rows` (every patient in the one "step"), each patient's term of norm at most
    `max_norm`; None for no rows (a node that releases nothing)."""
    if rows.empty:
        return None
    patient_of_row, _ = patient_index(rows)
    patients = int(patient_of_row.max()) + 1
    privacy = privacy.model_copy(update={"max_grad_norm": float(max_norm)})
    return plan_patient_dp(patients, 1, privacy, patients, node=node), patient_of_row


def gaussian_release(total: np.ndarray, plan: PatientDPPlan) -> np.ndarray:
    """One release of a sum over patients, each patient's term of norm at most
    max_grad_norm: the Gaussian mechanism with the plan's noise (OS entropy, never the
    run's seed)."""
    rng = np.random.default_rng(_entropy_seed())
    return total + rng.normal(0.0, plan.noise_multiplier * plan.max_grad_norm,
                              size=total.shape)
