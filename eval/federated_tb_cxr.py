"""Federated vs central translators on two real hospitals (Montgomery -> Shenzhen chest
X-rays, ../shared/data/tb_cxr_2site), where no paired truth exists.

Trains, on a patient split (75% train per site): central CycleGAN and the federated
CycleGAN at K = 1 (two nodes: Montgomery, Shenzhen = reference), central per-site DDIB
and federated DDIB with local priors, all as in eval/federated_translators.py. Then on
the held-out Montgomery patients:

- agreement with central: SSIM of the federated output to the central output of the
  same family (1 = the federation reproduces central), beside identity's SSIM to it;
- style: a site classifier (logistic regression on 64-bin intensity histograms, trained
  on the raw training images of both sites) scores translated Montgomery against
  held-out Shenzhen: AUC 0.5 = indistinguishable from Shenzhen, 1 = still Montgomery;
- structure: SSIM of output to input (what a translator may not erase);
- memorization of the outputs against Shenzhen's training images.

    python eval/federated_tb_cxr.py --out eval_out/federated_tb_cxr

Writes OUT/results.csv, OUT/results.md, OUT/grid.png.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from harmonize.data.manifest import load_manifest
from harmonize.data.splits import patient_split
from harmonize.evaluation.federated_benchmark import (
    CG_SET,
    Federation,
    cyclegan_central,
    cyclegan_federated,
    ddib_central,
    ddib_federated,
    translate_at_nodes,
)
from harmonize.evaluation.report import markdown_table
from harmonize.memorization import memorization_report
from harmonize.metrics import bootstrap_mean_ci, ssim

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tb_cxr_2site" / "manifest.csv"


def histogram(x: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(x, 0, 1), bins=64, range=(0, 1), density=True)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eval_out/federated_tb_cxr")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--reference-site", default="shenzhen")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cyclegan-steps", type=int, default=300)
    ap.add_argument("--ddib-steps", type=int, default=200)
    ap.add_argument("--size", type=int, default=128, help="CycleGAN crop size")
    ap.add_argument("--parallel-nodes", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    runs = out / "runs"
    torch.set_num_threads(2)
    h = Federation(out, patient_split(load_manifest(Path(args.data)), test_size=0.25,
                                      seed=args.seed), args.reference_site)
    sites = list(h.test["site"])
    cg_set = {**CG_SET, "data.image_size": args.size}

    outputs = {"identity": h.inputs}
    t, _ = cyclegan_central(h, runs / "cyclegan_central", args.seed, args.cyclegan_steps, 2,
                            cg_set)
    outputs["cyclegan central"] = t.transform(h.inputs, sites)
    t, _, _ = cyclegan_federated(h, runs / "cyclegan_federated_k1", args.seed,
                                 args.cyclegan_steps, 2, 1, parallel_nodes=args.parallel_nodes,
                                 cg_set=cg_set)
    outputs["cyclegan federated K=1"] = t.transform(h.inputs, sites)
    t, _ = ddib_central(h, runs / "ddib_central", args.seed, args.ddib_steps)
    outputs["ddib central"] = t.transform(h.inputs, sites)
    summary, _ = ddib_federated(h, runs / "ddib_local", args.seed, args.ddib_steps, "local",
                                parallel_nodes=args.parallel_nodes)
    outputs["ddib federated local priors"] = translate_at_nodes(h, summary["node_models"])

    # style: a site classifier trained on raw training images of both hospitals
    train = {s: h.site_images(s, "train") for s in h.sites}  # read once
    train_x = [histogram(x) for s in h.sites for x in train[s]]
    train_y = [int(s == h.ref) for s in h.sites for _ in train[s]]
    site_clf = LogisticRegression(max_iter=2000, C=1.0).fit(train_x, train_y)
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
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(markdown_table(table))
    print(markdown_table(table))
    grid(out / "grid.png", h, outputs)


def grid(path: Path, h: Federation, outputs: dict, n: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from harmonize.report.html import image_grid

    test = h.test.reset_index(drop=True)
    picks = [int(i) for g in test.groupby("label").groups.values() for i in list(g)[: n // 2]]
    names = list(outputs)
    rows = [[np.clip(outputs[m][i], 0, 1) for m in names] for i in picks]
    titles = [f"{test.loc[i, 'patient_id']} ({test.loc[i, 'label']})" for i in picks]
    fig = image_grid(rows, ["input (Montgomery)" if m == "identity" else m for m in names],
                     titles, cell_inches=1.9)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
