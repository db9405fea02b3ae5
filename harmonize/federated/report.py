"""OUT/report.html of a federated run: the answer in a sentence (did every round
aggregate, which node failed, where the model is), the per-round plot and table, and
what crossed the network."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harmonize.federated.config import FederatedConfig
from harmonize.report.html import HtmlReport

TASK_NAMES = {"classifier": "classifier", "cyclegan": "CycleGAN translator",
              "diffusion": "DDIB diffusion translator"}


def rounds_answer(cfg: FederatedConfig, rounds: pd.DataFrame, summary: dict) -> str:
    aggregated = int(rounds["aggregated"].sum()) if "aggregated" in rounds else 0
    text = (f"{TASK_NAMES.get(cfg.task, cfg.task)} trained over {summary['nodes']} nodes: "
            f"{aggregated} of {cfg.rounds} round(s) aggregated in {summary['seconds']:.0f} s")
    failures = summary.get("failures", [])
    text += (f"; {len(failures)} node failure(s), listed below" if failures
             else "; no node failed")
    if summary.get("epsilon") is not None:
        unit = summary.get("epsilon_unit") or "hospital"
        level = "patient-level DP-SGD" if unit == "patient" else "node-level DP"
        text += (f"; {level}, epsilon {summary['epsilon']:.3g} per {unit} "
                 f"(delta {summary['delta']:g})")
    if "train_bytes_sent" in rounds and rounds["train_bytes_sent"].notna().any():
        text += (f"; each node sent {rounds['train_bytes_sent'].mean() / 1e6:.2f} MB of "
                 "weights per round (no images)")
    model = summary.get("model")
    text += f". Model: {model}." if model else ". No model was written (no round aggregated)."
    return text


def write_rounds_report(out: Path, cfg: FederatedConfig, rounds: pd.DataFrame,
                        summary: dict, plot: Path) -> Path:
    report = HtmlReport(f"harmonize federated: {TASK_NAMES.get(cfg.task, cfg.task)}")
    report.answer(rounds_answer(cfg, rounds, summary))
    report.paragraph(f"Strategy {cfg.strategy}, seed {cfg.seed}, privacy {cfg.privacy.dp}. "
                     "Only weights and a few scalar metrics left the nodes "
                     "(docs/federated.md says which networks each task shares).")
    if plot.is_file():
        report.image(plot, "Per round: the nodes' training metrics (and their evaluation "
                     "of the global model on their own held-out patients, where they have "
                     "any).")
    report.heading("Rounds")
    report.table(rounds)
    if summary.get("failures"):
        report.heading("Node failures")
        report.table(pd.DataFrame(summary["failures"]))
    report.link("rounds.csv", "rounds.csv")
    report.link("summary.json", "summary.json")
    return report.save(out / "report.html")
