"""Central vs federated translators, the experiments of eval/federated_translators.py and
eval/federated_tb_cxr.py.

On the synthetic benchmark (paired truth), several seeds: the central CycleGAN against
the federated one at K local steps per round, and central per-site DDIB against federated
DDIB with local priors or one shared prior, identity and histogram matching beside, with
the memorization check of everything that leaves a node. On two real hospitals, where no
truth exists: agreement of each federated output with central's, a site classifier's AUC
(style) and SSIM to the input (structure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.data.manifest import load_manifest
from harmonize.data.splits import patient_split
from harmonize.evaluation.federated_benchmark import (
    CG_SET,
    CONFIGS,
    Benchmark,
    Federation,
    Scores,
    cyclegan_central,
    cyclegan_federated,
    ddib_central,
    ddib_federated,
    translate_at_nodes,
)
from harmonize.evaluation.report import markdown_table
from harmonize.memorization import memorization_report
from harmonize.metrics import bootstrap_mean_ci, ssim
from harmonize.report.html import image_grid, subplots

TASKS = ("cyclegan", "diffusion")
# Montgomery -> Shenzhen chest X-rays, next to the repository (../shared/data)
TB_CXR_DATA = CONFIGS.parents[1] / "shared" / "data" / "tb_cxr_2site" / "manifest.csv"


@dataclass
class TranslatorSettings:
    """One comparison on the synthetic benchmark (`task` cyclegan or diffusion). steps:
    central optimizer steps (federated: rounds x K); batch: images per source node per
    step; ks: CycleGAN local steps per round; server_lr_scale "1" or "k": server Adam lr =
    central lr (x K); rounds: the shared DDIB prior's rounds; runs (default OUT/runs):
    finished runs there are reused. size: the benchmark's image size."""

    task: str
    out: Path
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    per_site: int = 40
    steps: int = 300
    batch: int = 2
    ks: list[int] = field(default_factory=lambda: [1, 5, 20])
    local_lr: float | None = None
    server_lr_scale: str | None = None
    rounds: int = 10
    parallel_nodes: int = 2
    runs: Path | None = None
    size: int = 64

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.server_lr_scale not in (None, "1", "k"):
            raise ValueError(f"server_lr_scale {self.server_lr_scale!r}: choose 1 or k")
        self.out = Path(self.out)
        self.runs = Path(self.runs) if self.runs else self.out / "runs"


# --- synthetic benchmark (paired truth) -----------------------------------------------------
def add_baselines(scores: Scores, bench: Benchmark, seed: int) -> None:
    """Identity and histogram matching to the reference site's training images."""
    from harmonize.translators import HistogramMatching

    scores.add("identity", seed, bench.inputs, {})
    ref_train = bench.site_images(bench.ref, "train")
    hm = HistogramMatching().fit(zip(ref_train, [bench.ref] * len(ref_train), strict=True),
                                 bench.ref)
    scores.add("histogram-matching", seed, hm.transform(bench.inputs, list(bench.test["site"])),
               {})


def reverse_memorization(bench: Benchmark, run_dir: Path, cfg_path: Path) -> float:
    """F renders reference images as each source site: flagged share against that site's
    training images (F's weights leave every node)."""
    import torch
    from safetensors.torch import load_file

    from harmonize.federated.config import load_federated_config as load
    from harmonize.federated.cyclegan_task import CycleGANTask
    from harmonize.federated.server_app import SHARED_WEIGHTS

    task = CycleGANTask(load(cfg_path))
    arrays = load_file(run_dir / SHARED_WEIGHTS)
    f = task.reverse_generator(arrays)
    ref_test = torch.from_numpy(np.stack(bench.site_images(bench.ref, "test")))[:, None]
    flagged = []
    for i, site in enumerate(task.sites):
        cond = torch.zeros(len(ref_test), len(task.sites))
        cond[:, i] = 1
        with torch.no_grad():
            x = torch.nn.functional.interpolate(ref_test, size=task.size, mode="area") * 2 - 1
            rendered = ((f(x, cond) + 1) / 2).clamp(0, 1)[:, 0].numpy()
        mem = memorization_report(list(rendered), bench.site_images(site, "train"),
                                  bench.site_images(site, "test"))
        flagged.append(mem["flagged_share"])
    return float(np.mean(flagged))


def prior_memorization(bench: Benchmark, translator, sites: list[str]) -> float:
    """Draws from each travelling prior against that site's training images."""
    flagged = []
    for site in sites:
        draws = [x[0].numpy() for x in translator.sample_prior(16, site)]
        flagged.append(memorization_report(draws, bench.site_images(site, "train"),
                                           bench.site_images(site, "test"))["flagged_share"])
    return float(np.mean(flagged))


def run_cyclegan(s: TranslatorSettings) -> Scores:
    """Per seed: identity, histogram matching, the central CycleGAN and the federated one
    at every K (runs in `s.runs`: central_sSEED, federated_kK[_lrk]_sSEED)."""
    bench = Benchmark(s.out, s.per_site, s.size)
    scores = Scores(bench)
    sites = list(bench.test["site"])
    for seed in s.seeds:
        add_baselines(scores, bench, seed)
        t, wall = cyclegan_central(bench, s.runs / f"central_s{seed}", seed, s.steps, s.batch)
        scores.add("central", seed, t.transform(bench.inputs, sites),
                   {"wall_s": wall, "rounds": s.steps})
        for k in s.ks:
            lr_tag = "_lrk" if s.server_lr_scale == "k" else ""
            run_dir = s.runs / f"federated_k{k}{lr_tag}_s{seed}"
            t, extra, _ = cyclegan_federated(
                bench, run_dir, seed, s.steps, s.batch, k, parallel_nodes=s.parallel_nodes,
                local_lr=s.local_lr, server_lr_scale=s.server_lr_scale)
            extra["reverse_memorized_share"] = reverse_memorization(
                bench, run_dir, run_dir / "config.yaml")
            scores.add(f"federated K={k}" + (" lr x K" if lr_tag else ""), seed,
                       t.transform(bench.inputs, sites), extra)
    return scores


def run_diffusion(s: TranslatorSettings) -> Scores:
    """Per seed: identity, histogram matching, central per-site DDIB, federated DDIB with
    local priors and with one shared prior (runs: central_, local_, shared_sSEED)."""
    from harmonize.translators import load_translator

    bench = Benchmark(s.out, s.per_site, s.size)
    scores = Scores(bench)
    sites = list(bench.test["site"])
    for seed in s.seeds:
        add_baselines(scores, bench, seed)
        t, wall = ddib_central(bench, s.runs / f"central_s{seed}", seed, s.steps)
        scores.add("central", seed, t.transform(bench.inputs, sites),
                   {"wall_s": wall, "rounds": s.steps})
        summary, extra = ddib_federated(bench, s.runs / f"local_s{seed}", seed, s.steps,
                                        "local", rounds=s.rounds,
                                        parallel_nodes=s.parallel_nodes)
        extra["reverse_memorized_share"] = prior_memorization(
            bench, load_translator(summary["model"]), [bench.ref])
        scores.add("federated local priors", seed,
                   translate_at_nodes(bench, summary["node_models"]), extra)
        summary, extra = ddib_federated(bench, s.runs / f"shared_s{seed}", seed, s.steps,
                                        "shared", rounds=s.rounds,
                                        parallel_nodes=s.parallel_nodes)
        t = load_translator(summary["model"])
        extra["reverse_memorized_share"] = prior_memorization(bench, t, bench.sites)
        scores.add("federated shared prior", seed, t.transform(bench.inputs, sites), extra)
    return scores


def run_translator_benchmark(s: TranslatorSettings) -> pd.DataFrame:
    """Run the comparison and write its outputs (`write_outputs`): the summary."""
    s.out.mkdir(parents=True, exist_ok=True)
    scores = run_cyclegan(s) if s.task == "cyclegan" else run_diffusion(s)
    return write_outputs(s.out, s.task, scores)


def write_outputs(out: Path, task: str, scores: Scores) -> pd.DataFrame:
    """OUT/results.csv (per method and seed), OUT/per_image.csv, OUT/summary.csv and
    summary.md (per method), and for CycleGAN OUT/k_sweep.png: the summary."""
    pd.DataFrame(scores.rows).to_csv(out / "results.csv", index=False)
    pd.concat(scores.per_image).to_csv(out / "per_image.csv", index=False)
    summary = scores.summary()
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(markdown_table(summary))
    if task == "cyclegan":
        plot_k_sweep(summary, out / "k_sweep.png")
    return summary


def plot_k_sweep(summary: pd.DataFrame, path: Path) -> None:
    """SSIM against K (both server lr rules) with the baselines as lines, and the MB each
    node sends in the whole run; nothing when the summary has no federated rows."""
    fed = summary[summary["method"].str.startswith("federated K=")].sort_values("K")
    if fed.empty:
        return
    fig, (a, b) = subplots(1, 2, figsize=(8.5, 3.2))
    scaled = fed["method"].str.contains("lr x K")
    k1 = fed[(~scaled) & (fed["K"] == 1)]  # at K = 1 both rules are the same run
    for part, label in ((fed[~scaled], "server lr = central lr"),
                        (pd.concat([k1, fed[scaled]]) if scaled.any() else fed[scaled],
                         "server lr = central lr x K")):
        if not part.empty:
            a.errorbar(part["K"], part["ssim"], yerr=[part["ssim"] - part["ssim_lo"],
                                                      part["ssim_hi"] - part["ssim"]],
                       marker="o", capsize=3, label=label)
    a.legend(fontsize=7, loc="lower left")
    for name, style in (("central", "--"), ("identity", ":"), ("histogram-matching", "-.")):
        row = summary[summary["method"] == name]
        if not row.empty:
            a.axhline(float(row["ssim"].iloc[0]), ls=style, color="grey", lw=1)
            a.text(fed["K"].max(), float(row["ssim"].iloc[0]), f" {name}", fontsize=7,
                   va="bottom", ha="right")
    a.set_xscale("log")
    a.set_xticks(fed["K"], [str(int(k)) for k in fed["K"]])
    a.set_xlabel("K, local steps between aggregations")
    a.set_ylabel("SSIM to the paired truth")
    fed = fed[~scaled] if (~scaled).any() else fed
    total_mb = fed["bytes_per_node_round"] * fed["rounds"] / 1e6
    b.plot(fed["K"], total_mb, marker="o")
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xticks(fed["K"], [str(int(k)) for k in fed["K"]])
    b.set_xlabel("K")
    b.set_ylabel("MB sent per node, whole run")
    b.set_title(f"{fed['bytes_per_node_round'].iloc[0] / 1e6:.2f} MB per node per round",
                fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- two real hospitals (no paired truth) ---------------------------------------------------
@dataclass
class TbCxrSettings:
    """The two-hospital comparison: `data` a two-site manifest, patient split 75/25 by
    `seed`; size: the CycleGAN crop size (DDIB priors stay at their config's size)."""

    out: Path
    data: Path = TB_CXR_DATA
    reference_site: str = "shenzhen"
    seed: int = 0
    cyclegan_steps: int = 300
    ddib_steps: int = 200
    size: int = 128
    parallel_nodes: int = 2

    def __post_init__(self) -> None:
        self.out, self.data = Path(self.out), Path(self.data)


def histogram(x: np.ndarray) -> np.ndarray:
    """64-bin intensity density over [0, 1]: the site classifier's features."""
    return np.histogram(np.clip(x, 0, 1), bins=64, range=(0, 1), density=True)[0]


def fit_site_classifier(train: dict[str, list[np.ndarray]], ref: str):
    """Logistic regression on intensity histograms of each site's raw training images:
    predict_proba(...)[:, 1] is P(reference site)."""
    from sklearn.linear_model import LogisticRegression

    x = [histogram(im) for site in train for im in train[site]]
    y = [int(site == ref) for site in train for _ in train[site]]
    return LogisticRegression(max_iter=2000, C=1.0).fit(x, y)


def train_tb_cxr(h: Federation, s: TbCxrSettings) -> dict[str, list[np.ndarray]]:
    """The held-out source images as identity, central and federated CycleGAN (K = 1) and
    central and federated DDIB (local priors) translate them (runs in OUT/runs)."""
    runs = s.out / "runs"
    sites = list(h.test["site"])
    cg_set = {**CG_SET, "data.image_size": s.size}
    outputs = {"identity": h.inputs}
    t, _ = cyclegan_central(h, runs / "cyclegan_central", s.seed, s.cyclegan_steps, 2, cg_set)
    outputs["cyclegan central"] = t.transform(h.inputs, sites)
    t, _, _ = cyclegan_federated(h, runs / "cyclegan_federated_k1", s.seed, s.cyclegan_steps,
                                 2, 1, parallel_nodes=s.parallel_nodes, cg_set=cg_set)
    outputs["cyclegan federated K=1"] = t.transform(h.inputs, sites)
    t, _ = ddib_central(h, runs / "ddib_central", s.seed, s.ddib_steps)
    outputs["ddib central"] = t.transform(h.inputs, sites)
    summary, _ = ddib_federated(h, runs / "ddib_local", s.seed, s.ddib_steps, "local",
                                parallel_nodes=s.parallel_nodes)
    outputs["ddib federated local priors"] = translate_at_nodes(h, summary["node_models"])
    return outputs


def tb_cxr_table(h: Federation, outputs: dict[str, list[np.ndarray]]) -> pd.DataFrame:
    """Per method: site AUC of its outputs against the reference's held-out images (0.5 =
    indistinguishable), SSIM to the input, memorized share against the reference's
    training images, and (not identity) SSIM to the central output of its family
    ("cyclegan central" for cyclegan*, else "ddib central") with a CI, beside identity's."""
    from sklearn.metrics import roc_auc_score

    train = {s: h.site_images(s, "train") for s in h.sites}  # read once
    site_clf = fit_site_classifier(train, h.ref)
    ref_test = h.site_images(h.ref, "test")
    ref_train = train[h.ref]
    rows = []
    for method, ys in outputs.items():
        family = "cyclegan central" if method.startswith("cyclegan") else "ddib central"
        scores = site_clf.predict_proba([histogram(x) for x in [*ys, *ref_test]])[:, 1]
        labels = [0] * len(ys) + [1] * len(ref_test)
        to_input = [ssim(np.clip(y, 0, 1), x) for y, x in zip(ys, h.inputs, strict=True)]
        row = {"method": method, "site_auc": roc_auc_score(labels, scores),
               "ssim_to_input": float(np.mean(to_input)),
               "memorized_share": memorization_report(ys, ref_train,
                                                      ref_test)["flagged_share"]}
        if method != "identity":
            agree = [ssim(np.clip(y, 0, 1), np.clip(c, 0, 1))
                     for y, c in zip(ys, outputs[family], strict=True)]
            mean, lo, hi = bootstrap_mean_ci(agree)
            base = [ssim(x, np.clip(c, 0, 1)) for x, c in zip(h.inputs, outputs[family],
                                                               strict=True)]
            row.update({"ssim_to_central": mean, "ssim_to_central_lo": lo,
                        "ssim_to_central_hi": hi, "identity_ssim_to_central":
                        float(np.mean(base))})
        rows.append(row)
        print(row, flush=True)
    return pd.DataFrame(rows)


def grid(path: Path, h: Federation, outputs: dict, n: int = 4) -> None:
    """The same held-out patients (n // 2 per label) through every method, as a PNG."""
    test = h.test.reset_index(drop=True)
    picks = [int(i) for g in test.groupby("label").groups.values() for i in list(g)[: n // 2]]
    names = list(outputs)
    rows = [[np.clip(outputs[m][i], 0, 1) for m in names] for i in picks]
    titles = [f"{test.loc[i, 'patient_id']} ({test.loc[i, 'label']})" for i in picks]
    fig = image_grid(rows, ["input (Montgomery)" if m == "identity" else m for m in names],
                     titles, cell_inches=1.9)
    fig.savefig(path, dpi=80)


def run_tb_cxr(s: TbCxrSettings) -> pd.DataFrame:
    """Split, train, score; writes OUT/results.csv, OUT/results.md and OUT/grid.png."""
    h = Federation(s.out, patient_split(load_manifest(s.data), test_size=0.25, seed=s.seed),
                   s.reference_site)
    outputs = train_tb_cxr(h, s)
    table = tb_cxr_table(h, outputs)
    table.to_csv(s.out / "results.csv", index=False)
    (s.out / "results.md").write_text(markdown_table(table))
    grid(s.out / "grid.png", h, outputs)
    return table
