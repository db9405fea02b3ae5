"""One harmonized copy of the dataset per translator, for the evaluation matrix.

Each translator is fitted (classical kinds), trained (cyclegan / diffusion, from a
config, centrally or federated with Flower) or loaded (checkpoint), then applied to every
image of the manifest with `harmonize apply`, so the classifier sees exactly what a
user's harmonized folder holds.
Translators never see labels; they do see (unlabelled) images of every site, the test
site included, as unsupervised domain adaptation does. Reported as such.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from harmonize.apply import apply_translator, mirrored_relpaths
from harmonize.configs import ConfigError
from harmonize.data.manifest import save_manifest
from harmonize.evaluation.config import TranslatorSpec
from harmonize.fit import fit_and_save
from harmonize.translators import TRANSLATORS, load_translator

CYCLEGAN_FAMILY = ("cyclegan", "histogram-residual", "cut")  # one trainer, three objectives
TRAINED_KINDS = (*CYCLEGAN_FAMILY, "diffusion")


@dataclass
class HarmonizedSet:
    name: str
    kind: str
    model_dir: Path
    folder: Path
    manifest: pd.DataFrame  # the input rows with path -> the harmonized file
    seconds: dict[str, float]


def check_specs(specs: list[TranslatorSpec]) -> None:
    """Fail before any training on unknown kinds or missing files."""
    problems = []
    for s in specs:
        kind = s.resolved_kind
        if kind not in TRANSLATORS:
            problems.append(f"translator '{s.name}': unknown kind '{kind}' (known: "
                            f"{', '.join(sorted(TRANSLATORS))})")
        if s.checkpoint is not None and not s.checkpoint.exists():
            problems.append(f"translator '{s.name}': checkpoint {s.checkpoint} not found")
        if s.config is not None and not s.config.is_file():
            problems.append(f"translator '{s.name}': config {s.config} not found")
        if kind in TRAINED_KINDS and s.checkpoint is None and s.config is None:
            problems.append(f"translator '{s.name}': a {kind} needs a checkpoint or a config")
        if s.federated and (kind not in TRAINED_KINDS or s.config is None):
            problems.append(f"translator '{s.name}': federated needs kind cyclegan or "
                            "diffusion and a configs/federated YAML as config")
    if problems:
        raise ConfigError("; ".join(problems))


def build_model(spec: TranslatorSpec, manifest: Path, df: pd.DataFrame, reference_site: str,
                out: Path, progress: bool) -> Path:
    """Fit / train / locate the translator; returns its checkpoint directory."""
    kind = spec.resolved_kind
    if spec.checkpoint is not None:
        return spec.checkpoint
    if spec.federated:
        return train_federated(spec, manifest, reference_site, out / "run", progress)
    if kind in TRAINED_KINDS:
        run = out / "run"
        overrides = {"data.manifest": str(manifest), "data.reference_site": reference_site,
                     "train.out": str(run), **spec.set}
        if kind in CYCLEGAN_FAMILY:  # the config says which objective
            from harmonize.translators.cyclegan import train_cyclegan as train
            from harmonize.translators.cyclegan.config import load_config
        else:
            from harmonize.translators.diffusion import train_diffusion as train
            from harmonize.translators.diffusion.config import load_config
        config = load_config(spec.config, overrides)
        config.train.progress = progress
        if _finished_same_run(run, config):
            return run / "model"  # a rerun of the evaluation: the same training, done
        shutil.rmtree(run, ignore_errors=True)  # a different or unfinished training
        return train(config)
    translator = TRANSLATORS[kind](**spec.params)
    return fit_and_save(translator, df, manifest, reference_site, out / "model", progress)


def train_federated(spec: TranslatorSpec, manifest: Path, reference_site: str, run: Path,
                    progress: bool) -> Path:
    """Flower simulation over the manifest's nodes (default: one per site); every node
    trains on all its rows (no held-out split: the evaluation keeps its own)."""
    from harmonize.federated.config import load_federated_config
    from harmonize.federated.run import resolved_config, run_federated

    overrides = {"manifest": str(Path(manifest).resolve()), "reference_site": reference_site,
                 "out": str(run.resolve()), "evaluate": False, "progress": progress,
                 **spec.set}
    config = load_federated_config(spec.config, overrides)
    if config.task not in TRAINED_KINDS:
        raise ConfigError(f"translator '{spec.name}': {spec.config} trains a "
                          f"'{config.task}', not a translator")
    saved = run / "config.yaml"
    if (run / "model" / "model.safetensors").is_file() and saved.is_file():
        resolved = resolved_config(config.model_copy(deep=True))
        old = yaml.safe_load(saved.read_text())
        if _same(old, resolved.model_dump(mode="json"), "progress"):
            return run / "model"
    shutil.rmtree(run, ignore_errors=True)
    return Path(run_federated(config)["model"])


def _same(old: dict, new: dict, *ignored: str) -> bool:
    for key in ignored:
        old.pop(key, None)
        new.pop(key, None)
    return old == new


def _finished_same_run(run: Path, config) -> bool:
    """True when RUN holds a finished training of exactly this config."""
    saved = run / "config.yaml"
    if not (run / "model" / "model.safetensors").is_file() or not saved.is_file():
        return False
    same = config.model_copy(deep=True)
    same.train.progress = True
    old = yaml.safe_load(saved.read_text())
    old.get("train", {})["progress"] = True
    return old == same.model_dump(mode="json")


def harmonize_dataset(spec: TranslatorSpec, manifest: Path, df: pd.DataFrame,
                      reference_site: str, out: Path, progress: bool = True) -> HarmonizedSet:
    """Build the translator and write OUT/images (mirrored tree) + OUT/manifest.csv."""
    seconds = {}
    t = time.perf_counter()
    model_dir = build_model(spec, manifest, df, reference_site, out, progress)
    seconds["fit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    translator = load_translator(model_dir)
    if translator.reference_site_ not in (None, reference_site):
        raise ConfigError(f"translator '{spec.name}' maps to '{translator.reference_site_}', "
                          f"not to the evaluation's reference site '{reference_site}'")
    folder = out / "images"
    (folder / "apply_log.csv").unlink(missing_ok=True)  # this run's log only
    summary = apply_translator(translator, manifest, folder, progress=progress)
    seconds["apply_s"] = time.perf_counter() - t
    if summary.errors:
        raise RuntimeError(f"translator '{spec.name}': {summary.errors} image(s) failed, e.g. "
                           f"{summary.error_files[:3]}; see {summary.log_path}")
    harmonized = df.copy()
    harmonized["path"] = [str(folder / r) for r in mirrored_relpaths(df)]
    save_manifest(harmonized, out / "manifest.csv")
    return HarmonizedSet(spec.name, translator.kind, Path(model_dir), folder, harmonized,
                         seconds)
