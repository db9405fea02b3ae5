"""Scoring central vs federated translators against paired truth on the synthetic benchmark."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.data.manifest import load_manifest, save_manifest
from harmonize.evaluation.fidelity import fidelity_image, prepare_benchmark, score_images
from harmonize.memorization import memorization_report
from harmonize.metrics import bootstrap_mean_ci

# the repo's configs/, found as harmonize/demo.py finds it (an editable install)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def fidelity_images(paths) -> list[np.ndarray]:
    """Files as the fidelity scorer sees them (model space, clipped to [0, 1])."""
    return [fidelity_image(p) for p in paths]


class Federation:
    """A patient-split manifest as the runs need it: one node per site, one central node,
    and the held-out non-reference images every method is scored on. Writes
    OUT/train_nodes.csv (the federated manifest) and OUT/train.csv (node = central)."""

    def __init__(self, out: Path, df: pd.DataFrame, ref: str) -> None:
        self.df, self.ref = df, ref
        self.train = df[df["split"] == "train"]
        self.test = df[(df["split"] == "test") & (df["site"] != ref)]
        self.sites = sorted(self.train["site"].astype(str).unique())
        self.sources = [s for s in self.sites if s != ref]
        out.mkdir(parents=True, exist_ok=True)
        self.fed_manifest, self.central_manifest = out / "train_nodes.csv", out / "train.csv"
        save_manifest(self.train, self.fed_manifest)
        save_manifest(self.train.assign(node="central"), self.central_manifest)
        self.inputs = fidelity_images(self.test["path"])

    def site_images(self, site: str, split: str) -> list[np.ndarray]:
        rows = self.df[(self.df["site"] == site) & (self.df["split"] == split)]
        return fidelity_images(rows["path"])


class Benchmark(Federation):
    """The synthetic sites (`prepare_benchmark`: 4 sites in OUT/synth, a patient split
    with 25% held out), with the paired truth of every held-out image (`truth`, in the
    order of `test`)."""

    def __init__(self, out: Path, per_site: int, size: int, seed: int = 0) -> None:
        train_csv, test_csv, info = prepare_benchmark(out, sites=4, per_site=per_site,
                                                      size=size, seed=seed, test_size=0.25)
        synth = out / "synth"
        df = pd.concat([load_manifest(train_csv), load_manifest(test_csv)],
                       ignore_index=True)
        # relpath as in the benchmark's own manifest (per-image tables key on it), and
        # reference_path, not a path column, stays relative to the benchmark folder
        df["relpath"] = [Path(p).resolve().relative_to(synth.resolve()).as_posix()
                         for p in df["path"]]
        super().__init__(out, df, info["reference_site"])
        self.truth_paths = [synth / p for p in self.test["reference_path"]]
        self.truth = fidelity_images(self.truth_paths)


class Scores:
    """Per method and seed: SSIM / PSNR of every output against the benchmark's truth
    (`rows`: means, memorized share and the extras given; `per_image`: one frame per
    `add`), and `summary`."""

    def __init__(self, bench: Benchmark) -> None:
        self.bench, self.rows, self.per_image = bench, [], []

    def add(self, method: str, seed: int, outputs: list[np.ndarray], extra: dict) -> None:
        b = self.bench
        s = score_images(outputs, b.truth)
        mem = memorization_report(outputs, b.site_images(b.ref, "train"),
                                  b.site_images(b.ref, "test"))
        row = {"method": method, "seed": seed, "ssim": float(s["ssim"].mean()),
               "psnr": float(s["psnr"].mean()), "memorized_share": mem["flagged_share"],
               **extra}
        self.rows.append(row)
        self.per_image.append(pd.DataFrame({
            "method": method, "seed": seed, "relpath": b.test["relpath"].to_numpy(),
            "site": b.test["site"].to_numpy(), "ssim": s["ssim"], "psnr": s["psnr"]}))
        print(f"{method:26s} seed {seed}: SSIM {row['ssim']:.3f}  PSNR {row['psnr']:.2f} dB"
              f"  memorized {mem['flagged_share']:.0%}", flush=True)

    def summary(self) -> pd.DataFrame:
        """Per method: mean over its seeds, a CI over images of the seed-mean score (seed
        spread: the per-seed means), and the paired difference to central on the same
        seeds and images (so a one-seed method is compared with central's same seed)."""
        per = pd.concat(self.per_image)
        results = pd.DataFrame(self.rows)

        def image_means(method: str, seeds) -> pd.DataFrame:
            part = per[(per["method"] == method) & per["seed"].isin(seeds)]
            return part.groupby("relpath")[["ssim", "psnr"]].mean()

        out = []
        for method in results["method"].unique():
            r = results[results["method"] == method]
            seeds = sorted(r["seed"].unique())
            m = image_means(method, seeds)
            mean, lo, hi = bootstrap_mean_ci(m["ssim"].tolist())
            row = {"method": method, "ssim": mean, "ssim_lo": lo, "ssim_hi": hi,
                   "psnr": float(m["psnr"].mean()),
                   "ssim_per_seed": " / ".join(f"{v:.3f}" for v in r["ssim"]),
                   "seeds": len(seeds)}
            central = image_means("central", seeds)
            if len(central) and method != "central":
                d = (m["ssim"] - central["ssim"]).dropna()
                dm, dlo, dhi = bootstrap_mean_ci(d.tolist())
                row.update({"minus_central": dm, "minus_central_lo": dlo,
                            "minus_central_hi": dhi})
                identity = image_means("identity", seeds)["ssim"].mean()
                gain = central["ssim"].mean() - identity
                row["share_of_central_gain"] = (mean - identity) / gain if gain else None
            for col in ("K", "rounds", "bytes_per_node_round", "seconds_per_round", "wall_s",
                        "memorized_share", "reverse_memorized_share"):
                if col in r and r[col].notna().any():
                    row[col] = float(r[col].mean())
            out.append(row)
        return pd.DataFrame(out)


# --- CycleGAN ---------------------------------------------------------------------------
CG_SET = {"data.image_size": 64, "model.n_blocks": 4, "data.polarity": "keep"}


def cyclegan_central(bench: Federation, out: Path, seed: int, steps: int, batch: int,
                     cg_set: dict = CG_SET):
    """The central CycleGAN (batch: per source site, so S x batch in all): (translator,
    wall seconds); a finished run in OUT (its wall.json) is reused."""
    from harmonize.translators import load_translator
    from harmonize.translators.cyclegan.config import load_config
    from harmonize.translators.cyclegan.train import train_cyclegan

    config = load_config(CONFIGS / "cyclegan/quick.yaml", {
        **cg_set, "data.manifest": str(bench.central_manifest),
        "data.reference_site": bench.ref, "train.batch_size": batch * len(bench.sources),
        "train.steps": steps, "train.seed": seed, "train.out": str(out),
        "train.progress": False, "train.sample_every": steps, "train.checkpoint_every": steps,
        "train.log_every": max(1, steps // 10)})
    done = out / "wall.json"
    if done.is_file():  # --runs: reuse a finished run
        return load_translator(out / "model"), json.loads(done.read_text())["wall_s"]
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts afresh
    started = time.perf_counter()
    model = train_cyclegan(config)
    wall = time.perf_counter() - started
    done.write_text(json.dumps({"wall_s": wall}))
    return load_translator(model), wall


def cyclegan_federated(bench: Federation, out: Path, seed: int, steps: int, batch: int,
                       k: int, *, parallel_nodes: int = 2, local_lr: float | None = None,
                       server_lr_scale: str | None = None, cg_set: dict = CG_SET,
                       privacy: dict | None = None) -> tuple:
    """The federated CycleGAN at K local steps per round for `steps` steps in all:
    (translator, extra columns for `Scores.add`, the run's summary); a finished run in OUT
    is reused. server_lr_scale "1" or "k": server Adam lr = central lr (x K)."""
    from harmonize.federated.config import load_federated_config
    from harmonize.federated.run import run_federated
    from harmonize.translators import load_translator

    overrides = {"manifest": str(bench.fed_manifest), "reference_site": bench.ref,
                 "out": str(out), "rounds": max(1, steps // k), "seed": seed,
                 "cyclegan.local_steps": k,
                 "cyclegan.config": str(CONFIGS / "cyclegan/quick.yaml"),
                 "cyclegan.set": {**cg_set, "train.batch_size": batch},
                 "parallel_nodes": parallel_nodes,
                 "threads_per_node": max(1, 2 // parallel_nodes), "progress": False,
                 **({"privacy": privacy} if privacy else {})}
    if local_lr:
        overrides["cyclegan.local_lr"] = local_lr
    if server_lr_scale:
        overrides["cyclegan.server_lr"] = 2e-4 * (k if server_lr_scale == "k" else 1)
    cfg = load_federated_config(CONFIGS / "federated/cyclegan-quick.yaml", overrides)
    done = out / "wall.json"
    if done.is_file():  # --runs: reuse a finished run
        summary = json.loads((out / "summary.json").read_text())
        wall = json.loads(done.read_text())["wall_s"]
    else:
        started = time.perf_counter()
        summary = run_federated(cfg)
        wall = time.perf_counter() - started
        done.write_text(json.dumps({"wall_s": wall}))
    rounds = pd.read_csv(out / "rounds.csv")
    extra = {"K": k, "rounds": cfg.rounds, "wall_s": wall,
             "bytes_per_node_round": sent_per_round(out, rounds),
             "seconds_per_round": float(np.diff(rounds["seconds"], prepend=0).mean())}
    return load_translator(summary["model"]), extra, summary


def sent_per_round(out: Path, rounds: pd.DataFrame) -> float:
    """Bytes each node sent per round (the nodes report it; else the shared weights)."""
    if "train_bytes_sent" in rounds and rounds["train_bytes_sent"].notna().any():
        return float(rounds["train_bytes_sent"].mean())
    from safetensors.torch import load_file

    from harmonize.federated.server_app import SHARED_WEIGHTS

    return float(sum(v.numel() * v.element_size()
                     for v in load_file(out / SHARED_WEIGHTS).values()))


# --- DDIB ---------------------------------------------------------------------------------
DD_SET = {"inference.steps": 20, "data.polarity": "keep"}


def ddib_central(bench: Federation, out: Path, seed: int, steps: int, dd_set: dict = DD_SET):
    """Central per-site DDIB: (translator, wall seconds); a finished run is reused."""
    from harmonize.translators import load_translator
    from harmonize.translators.diffusion.config import load_config
    from harmonize.translators.diffusion.train import train_diffusion

    done = out / "wall.json"
    if not done.is_file():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts afresh
        config = load_config(CONFIGS / "diffusion/quick.yaml", {
            **dd_set, "data.manifest": str(bench.central_manifest),
            "data.reference_site": bench.ref, "model.conditioning": "per-site",
            "inference.mode": "ddib", "train.steps": steps, "train.seed": seed,
            "train.out": str(out), "train.progress": False, "train.sample_every": steps,
            "train.checkpoint_every": steps})
        started = time.perf_counter()
        train_diffusion(config)
        done.write_text(json.dumps({"wall_s": time.perf_counter() - started}))
    return load_translator(out / "model"), json.loads(done.read_text())["wall_s"]


def ddib_federated(bench: Federation, out: Path, seed: int, steps: int, prior: str, *,
                   rounds: int = 10, parallel_nodes: int = 2, dd_set: dict = DD_SET,
                   privacy: dict | None = None) -> tuple[dict, dict]:
    """Federated DDIB, `prior` "local" (one round, each prior trained at its node) or
    "shared" (`rounds` rounds of steps / rounds local steps): (the run's summary, extra
    columns for `Scores.add`); a finished run is reused."""
    from harmonize.federated.config import load_federated_config
    from harmonize.federated.run import run_federated

    rounds = 1 if prior == "local" else rounds
    overrides = {"manifest": str(bench.fed_manifest), "reference_site": bench.ref,
                 "out": str(out), "rounds": rounds, "seed": seed,
                 "diffusion.prior": prior, "diffusion.local_steps": max(1, steps // rounds),
                 "diffusion.config": str(CONFIGS / "diffusion/quick.yaml"),
                 "diffusion.set": dd_set, "diffusion.sites": bench.sites,
                 "parallel_nodes": parallel_nodes,
                 "threads_per_node": max(1, 2 // parallel_nodes), "progress": False,
                 **({"privacy": privacy} if privacy else {})}
    cfg = load_federated_config(CONFIGS / "federated/diffusion-quick.yaml", overrides)
    done = out / "wall.json"
    if not done.is_file():
        started = time.perf_counter()
        run_federated(cfg)
        done.write_text(json.dumps({"wall_s": time.perf_counter() - started}))
    summary = json.loads((out / "summary.json").read_text())
    table = pd.read_csv(out / "rounds.csv")
    extra = {"rounds": rounds, "wall_s": json.loads(done.read_text())["wall_s"],
             "bytes_per_node_round": float(table["train_bytes_sent"].mean())
             if "train_bytes_sent" in table else None,
             "seconds_per_round": float(np.diff(table["seconds"], prepend=0).mean())}
    return summary, extra


def translate_at_nodes(bench: Federation, node_models: dict) -> list[np.ndarray]:
    """Each site's held-out images translated with that node's own checkpoint (as
    `harmonize apply` would at the node), back in the test order."""
    from harmonize.translators import load_translator

    outputs: list = [None] * len(bench.test)
    sites = list(bench.test["site"].astype(str))
    for site in sorted(set(sites)):
        idx = [i for i, s in enumerate(sites) if s == site]
        t = load_translator(node_models[site])
        for i, y in zip(idx, t.transform([bench.inputs[i] for i in idx], [site] * len(idx)),
                        strict=True):
            outputs[i] = y
    return outputs
