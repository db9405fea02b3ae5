"""What a node trains: small adapters between Flower's messages and the training code
central runs use. A task turns (global arrays, this node's local state, this node's
rows) into (updated arrays, new local state, metrics); it never sends images.

- `ClassifierTask` (classifier_task): the downstream classifier;
- `CycleGANTask` (cyclegan_task), `CUTTask` (cut_task: a config with loss.objective
  patchnce) and `DiffusionTask` (diffusion_task, one shared prior):
  the translators, whose loss terms come from the translators' own `losses.py`;
- `LocalPriorTask` (local_prior_task): DDIB with each site's prior trained at its node;
- `HistogramTask` (histogram_task): histogram matching, the reference node's landmarks;
- `TextureTask` (texture_task): texture matching, the reference node's targets, each
  node's own statistics fitted at home.
"""

from __future__ import annotations

from harmonize.federated.config import FederatedConfig


def build_task(config: FederatedConfig):
    if config.task == "classifier":
        from harmonize.federated.classifier_task import ClassifierTask

        return ClassifierTask(config)
    if config.task == "histogram":
        from harmonize.federated.histogram_task import HistogramTask

        return HistogramTask(config)
    if config.task == "texture":
        from harmonize.federated.texture_task import TextureTask

        return TextureTask(config)
    if config.task == "diffusion" and config.diffusion.prior == "local":
        from harmonize.federated.local_prior_task import LocalPriorTask

        return LocalPriorTask(config)
    if config.task == "diffusion":
        from harmonize.federated.diffusion_task import DiffusionTask

        return DiffusionTask(config)
    from harmonize.federated.cyclegan_task import CycleGANTask

    if CycleGANTask.translator_config(config).loss.objective == "patchnce":
        from harmonize.federated.cut_task import CUTTask  # CUT (or histogram-residual on it)

        return CUTTask(config)
    return CycleGANTask(config)
