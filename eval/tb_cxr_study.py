"""The real two-site study (docs/tb_cxr_study.md), one command:

    python eval/tb_cxr_study.py --out runs/tb_cxr            # full: about an hour, 2 CPU cores
    python eval/tb_cxr_study.py --quick --out runs/tb_quick  # a few minutes

Runs `harmonize evaluate` with configs/eval/tb_cxr_2site[_quick].yaml (Montgomery and
Shenzhen TB chest X-rays, ../shared/data/tb_cxr_2site) and writes OUT/study.md: the
tables the docs quote (external-site AUC per regime with CIs and the paired gain over
plain augmentation, in-site AUC, audit, radiomics site shift in the lung masks before /
after each translator, wall time per stage and the machine), so the numbers in the docs
are the ones this command prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import pandas as pd

from harmonize.classify.eval_report import markdown_table, shift_table
from harmonize.classify.evaluate import run_evaluation
from harmonize.classify.evaluate_config import load_eval_config

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}"


def study_markdown(out: Path, seconds: float) -> str:
    summary = json.loads((out / "summary.json").read_text())
    table = pd.read_csv(out / "summary_table.csv", keep_default_na=False, na_values=[""])
    cols = ["classifier", "regime", "translator", "seeds", "auc", "auc_lo", "auc_hi",
            "gain_vs_augment", "seeds_better_p05", "seeds_worse_p05"]
    parts = [f"Run: `{out}`; {summary['n_models']} classifiers; {seconds / 60:.1f} min on "
             f"{machine()}.\n"]
    for (protocol, site), g in table.groupby(["protocol", "test_site"], sort=False):
        title = ("external site" if protocol == "external" else
                 "held-out patients of the training site")
        parts += [f"\n### Test on {site} ({title})\n", markdown_table(g[cols])]
    audit = pd.read_csv(out / "audit" / "summary.csv")
    parts += ["\n### Hallucination audit (frozen CNN, translated test images)\n",
              markdown_table(audit)]
    if summary.get("site_shift"):
        parts += ["\n### Radiomics site shift in the lung masks, before / after\n",
                  markdown_table(shift_table(summary["site_shift"]))]
    timings = pd.DataFrame([{"stage": k, "seconds": v} for k, v in summary["timings"].items()])
    parts += ["\n### Wall time per stage (s)\n", markdown_table(timings, digits=1)]
    return "\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description="TB CXR two-site study (Montgomery, Shenzhen)")
    ap.add_argument("--out", default="runs/tb_cxr")
    ap.add_argument("--quick", action="store_true", help="the few-minute variant")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite OUT/study.md from a finished run")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    name = "tb_cxr_2site_quick.yaml" if args.quick else "tb_cxr_2site.yaml"
    started = time.perf_counter()
    if not args.report_only:
        os.chdir(ROOT)  # the config's data path is relative to the repository
        config = load_eval_config(ROOT / "configs" / "eval" / name, {"out": str(out)})
        run_evaluation(config)
    text = study_markdown(out, time.perf_counter() - started)
    (out / "study.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
