"""Federated run configuration (``configs/federated/*.yaml``), validated on load."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from harmonize.classify.config import ModelConfig
from harmonize.configs import ConfigError, Section, load_yaml_config

__all__ = ["ConfigError", "FederatedConfig", "load_federated_config"]


class PrivacyConfig(Section):
    mode: Literal["none", "node-dp", "patient-dp"] = Field(
        "none", description="node-dp: DP of a hospital's whole update on the aggregate "
        "(see dp); patient-dp: DP-SGD inside each node, epsilon per patient "
        "(harmonize/federated/patient_dp.py); docs/federated.md says which to use")
    dp: Literal["none", "server-fixed", "client-fixed"] = Field(
        "none", description="node-dp: clip each node's update to clipping_norm (server "
        "side, or client side with fixedclipping_mod) and add Gaussian noise of sd "
        "noise_multiplier * clipping_norm / nodes; setting it implies mode node-dp")
    noise_multiplier: float = Field(1.0, ge=0, description="node-dp's noise multiplier")
    clipping_norm: float = Field(1.0, gt=0, description="node-dp's clipping norm")
    delta: float = Field(1e-5, gt=0, lt=1)
    epsilon: float | None = Field(None, gt=0, description="patient-dp: target epsilon "
                                  "per patient over the whole run, at delta")
    max_grad_norm: float = Field(1.0, gt=0, description="patient-dp: clip of each "
                                 "patient's gradient (all its images summed)")
    patients_per_step: int | None = Field(None, ge=1, description="patient-dp: expected "
                                          "patients per DP-SGD step (Poisson sampling); "
                                          "default: the task's batch size")
    max_noise_multiplier: float = Field(20.0, gt=0, description="patient-dp: refuse to "
                                        "start when epsilon needs more noise than this")
    secagg: bool = Field(False, description="SecAgg+ (secure aggregation) for FedAvg "
                         "tasks: the server sees only the sum of the nodes' updates")

    @model_validator(mode="after")
    def _mode(self) -> PrivacyConfig:
        if self.dp != "none" and self.mode == "none":
            self.mode = "node-dp"  # configs that only set dp
        if self.mode == "node-dp" and self.dp == "none":
            self.dp = "server-fixed"
        if self.mode == "patient-dp":
            if self.dp != "none":
                raise ValueError("privacy: patient-dp and node-dp (dp) are separate "
                                 "modes; set dp: none or mode: node-dp")
            if self.epsilon is None:
                raise ValueError("privacy.epsilon: give the target epsilon per patient for "
                                 "patient-dp (e.g. 10)")
        return self


class ClassifierTaskConfig(Section):
    model: ModelConfig = ModelConfig()
    image_size: int = Field(64, ge=16)
    local_epochs: int = Field(1, ge=1, description="epochs per round at each node")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="local optimizer (sgd: momentum 0.9)")
    keep_optimizer: bool = Field(False, description="the local optimizer's state (Adam "
                                 "moments) stays at the node between rounds; else new "
                                 "each round")
    augment: bool = False
    balance: Literal["weighted-loss", "sampler", "none"] = "weighted-loss"
    local_bn: bool = Field(False, description="FedBN: normalization layers stay local")
    local_head: bool = Field(False, description="FedPer: the last (classification) layer "
                             "stays at each node, the body is averaged; the saved model "
                             "carries the nodes' mean head, for hospitals that have none")


class CycleGANTaskConfig(Section):
    config: Path | None = Field(None, description="CycleGAN YAML (model, loss, data.image_size)")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides of config")
    local_steps: int = Field(1, ge=1, description="K: local SGD steps per round at each node "
                             "between aggregations; 1 = FedSGD, exactly central training")
    local_lr: float = Field(5e-4, gt=0, description="learning rate of the nodes' local SGD "
                            "steps (cancels out at local_steps 1)")
    server_optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="adam: the central optimizer (config's lr, betas, schedule) on "
        "the summed node updates; sgd: the summed updates applied as they are")
    server_lr: float | None = Field(None, gt=0, description="adam's learning rate; default "
                                    "the CycleGAN config's train.lr")
    sites: list[str] | None = Field(None, description="the source sites in condition order "
                                    "(F and D_A are site-conditioned); default: the "
                                    "manifest's non-reference sites, sorted (give it in a "
                                    "deployment, where the server has no manifest)")
    template: Path | None = Field(None, description="a histogram-matching checkpoint (the "
                                  "federated histogram task's OUT/model): its reference "
                                  "thumbnail lets every node flip inverted exports "
                                  "(data.polarity: auto); histogram-residual runs take it "
                                  "from landmarks.checkpoint")


class DiffusionTaskConfig(Section):
    config: Path | None = Field(None, description="diffusion YAML (model, diffusion, "
                                "inference, data.image_size); trained site-conditioned, "
                                "translated with DDIB")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides of config")
    prior: Literal["shared", "local"] = Field(
        "shared", description="shared: one site-conditioned UNet averaged by FedAvg; local: "
        "each node trains its own site's prior (central per-site training code), only the "
        "reference prior's weights travel, each node translates its own images")
    local_steps: int = Field(40, ge=1, description="optimizer steps per round at each node "
                             "(prior local: the steps of each prior, in one round)")
    sites: list[str] | None = Field(None, description="every site, in class-label order; "
                                    "default: the manifest's sites, sorted (give it in a "
                                    "deployment, where the server has no manifest)")


class HistogramTaskConfig(Section):
    landmarks: int = Field(8, ge=3, description="intensity quantiles the reference node "
                           "releases (fewer: less DP noise per landmark, coarser map)")
    template: int = Field(16, ge=4, le=64, description="side of the mean thumbnail the "
                          "polarity guard correlates with (inverted exports are flipped)")
    intensity: Literal["auto", "bit-depth", "percentile"] = Field(
        "auto", description="how images map to [0, 1] (as harmonize fit)")


class TextureTaskConfig(Section):
    """The parameters of `TextureMatching` (harmonize train texture-matching)."""

    n_quantiles: int = Field(256, ge=3, description="ROI quantile landmarks")
    spectrum: Literal["site", "sharpen", "off"] = Field(
        "sharpen", description="filter each site's mean ROI ring spectrum onto the reference's "
        "(sharpen: never soften)")
    noise: Literal["reference", "keep"] = Field("reference", description="replace the fine "
                                                "band by noise drawn from the reference's")
    noise_sigma: float = Field(1.0, gt=0, description="fine band: what a Gaussian blur of "
                               "this many pixels removes")
    max_gain: float = Field(16.0, ge=1, description="largest spectral gain")
    fingerprints: Literal["remove", "everywhere", "keep"] = Field(
        "remove", description="inpaint borders and markers outside masks, also inside, or not")
    polarity: Literal["auto", "keep"] = "auto"
    seed: int = Field(0, ge=0, description="seed of the drawn noise")
    intensity: Literal["auto", "bit-depth", "percentile"] = Field(
        "auto", description="how images map to [0, 1] (as harmonize fit)")


ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")


class FederatedConfig(Section):
    task: Literal["classifier", "cyclegan", "diffusion", "histogram", "texture"]
    manifest: Path | None = None
    reference_site: str | None = None
    out: Path | None = None
    rounds: int = Field(10, ge=1)
    strategy: Literal["fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "krum"] = Field(
        "fedavg", description="Flower's strategy; the robust ones (fedmedian, "
        "fedtrimmedavg, krum) for the classifier task only")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx: weight of the proximal term")
    trim_beta: float = Field(0.2, gt=0, lt=0.5, description="FedTrimmedAvg: share cut at "
                             "each end, per value")
    krum_malicious_nodes: int = Field(0, ge=0, description="Krum: nodes assumed malicious")
    update_norm_factor: float | None = Field(
        10.0, gt=1, description="drop an update that moves the model more than this many "
        "times the round's median (classifier task, 3 or more nodes); null: no norm "
        "check (NaN/Inf and shape checks always apply)")
    min_nodes: int | None = Field(None, ge=1, description="nodes per round; default: every "
                                  "node of the manifest (give it when the server has none)")
    sample_nodes: float | None = Field(
        None, gt=0, description="nodes trained per round (classifier task): a count (3) or "
        "a fraction of the nodes (0.5); null: every node every round")
    checkpoint_every: int = Field(10, ge=1, description="rounds between the server's "
                                  "checkpoints (OUT/server_state) that --resume continues")
    resume: bool = Field(False, description="continue from OUT/server_state (--resume)")
    evaluate: bool = Field(True, description="each node scores the global model on its "
                           "split=test rows after every round")
    seed: int = 0
    privacy: PrivacyConfig = PrivacyConfig()
    classifier: ClassifierTaskConfig = ClassifierTaskConfig()
    cyclegan: CycleGANTaskConfig = CycleGANTaskConfig()
    diffusion: DiffusionTaskConfig = DiffusionTaskConfig()
    histogram: HistogramTaskConfig = HistogramTaskConfig()
    texture: TextureTaskConfig = TextureTaskConfig()
    threads_per_node: int = Field(2, ge=1, description="torch threads of each client")
    parallel_nodes: int = Field(1, ge=1, description="simulation: nodes training at once, "
                                "each with threads_per_node threads (Ray actors)")
    gpus_per_node: float | None = Field(
        None, ge=0, le=1, description="simulation: GPU share of each node (Ray's num_gpus); "
        "None: 1 / parallel_nodes when a GPU is present, else 0")
    progress: bool = True

    def gpu_share(self) -> float:
        """The GPU share each simulated node asks Ray for."""
        if self.gpus_per_node is not None:
            return self.gpus_per_node
        import torch

        return 1.0 / self.parallel_nodes if torch.cuda.is_available() else 0.0

    @model_validator(mode="after")
    def _checks(self) -> FederatedConfig:
        if self.privacy.secagg:  # secure_aggregation.py: what SecAgg+ can sum
            if self.privacy.mode == "node-dp":
                raise ValueError("privacy.secagg: node-level DP clips each node's update at "
                                 "the server, which SecAgg+ hides; use patient-dp with it")
            if self.task in ("histogram", "texture") or (self.task == "diffusion"
                                                         and self.diffusion.prior == "local"):
                raise ValueError("privacy.secagg: this task sends one node's arrays, not a "
                                 "mean to aggregate; run it without secagg")
        if self.strategy in ROBUST_STRATEGIES:
            if self.task != "classifier":
                raise ValueError(f"strategy {self.strategy}: task {self.task} needs the "
                                 "mean of the updates (its objective is a sum over the "
                                 "nodes, each holding other sites' terms, or nothing is "
                                 "averaged); use fedavg")
            if self.privacy.secagg:
                raise ValueError(f"strategy {self.strategy}: SecAgg+ shows the server only "
                                 "the sum of the updates, so it cannot take a median or "
                                 "drop any; use fedavg with secagg")
        if self.sample_nodes is not None:
            if self.task != "classifier":
                raise ValueError(f"sample_nodes: task {self.task} needs every node every "
                                 "round (its objective is a sum over the nodes' sites, or "
                                 "one node releases); sample only for the classifier")
            if self.privacy.secagg:
                raise ValueError("sample_nodes: SecAgg+ runs every node every round here; "
                                 "use one or the other")
            if self.sample_nodes > 1 and self.sample_nodes != int(self.sample_nodes):
                raise ValueError(f"sample_nodes {self.sample_nodes}: a count (an integer) "
                                 "or a fraction below 1")
        if self.task == "cyclegan" and self.cyclegan.config is None:
            raise ValueError("cyclegan.config: give a CycleGAN YAML, e.g. "
                             "configs/cyclegan/quick.yaml")
        if self.task == "diffusion" and self.diffusion.prior == "local":
            if self.rounds != 1:
                raise ValueError("diffusion.prior local: set rounds: 1 (each node trains its "
                                 "prior in one round, nothing is averaged) and give the "
                                 "steps as diffusion.local_steps")
            if not self.evaluate:
                raise ValueError("diffusion.prior local: set evaluate: true (the evaluation "
                                 "message delivers the reference prior to every node)")
            if self.privacy.dp != "none":
                raise ValueError("diffusion.prior local: node-level DP (privacy.dp) needs "
                                 "an average over nodes and there is none; use dp: none")
        if self.task == "histogram":
            if self.rounds != 1:
                raise ValueError("task histogram: set rounds: 1 (the reference node "
                                 "releases its landmarks once)")
            if self.privacy.mode == "node-dp":
                raise ValueError("task histogram: node-level DP needs an average over "
                                 "nodes and only the reference node sends; use mode "
                                 "patient-dp")
        if self.task == "texture":
            if self.rounds != 1 or not self.evaluate:
                raise ValueError("task texture: set rounds: 1 and evaluate: true (the "
                                 "reference node releases its targets once; the evaluation "
                                 "message delivers them to every node, which fits its own "
                                 "sites at home)")
            if self.privacy.mode == "node-dp" or self.privacy.dp != "none":
                raise ValueError("task texture: node-level DP needs an average over nodes "
                                 "and only the reference node sends; use mode patient-dp")
        if self.task == "diffusion" and self.diffusion.config is None:
            raise ValueError("diffusion.config: give a diffusion YAML, e.g. "
                             "configs/diffusion/quick.yaml")
        return self

    def sampled(self, n_nodes: int) -> int:
        """How many of `n_nodes` train each round."""
        if self.sample_nodes is None:
            return n_nodes
        k = (int(self.sample_nodes) if self.sample_nodes >= 1
             else math.ceil(self.sample_nodes * n_nodes))
        return max(1, min(n_nodes, k))

    def check_ready(self) -> None:
        missing = [k for k in ("manifest", "out") if getattr(self, k) is None]
        if self.task != "classifier" and self.reference_site is None:
            missing.append("reference_site")
        if missing:
            raise ConfigError(f"missing {', '.join(missing)} (--data / --out / "
                              "--reference-site)")
        if not Path(self.manifest).is_file():
            raise ConfigError(f"manifest {self.manifest} not found")


def load_federated_config(path: str | Path | None,
                          overrides: dict[str, Any] | None = None) -> FederatedConfig:
    return load_yaml_config(FederatedConfig, path, overrides)
