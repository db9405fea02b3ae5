"""Seconds per round of the federated classifier with each aggregation strategy, and
what the update checks cost, measured in the same run.

1. `harmonize federated` of configs/federated/classifier-quick.yaml (tiny settings, 4
   synthetic nodes, --rounds rounds) with fedavg without the norm check
   (update_norm_factor null; NaN and shape checks stay on), fedavg with it (the
   default), fedmedian, fedtrimmedavg and krum; median seconds per round (rounds 2..R
   from rounds.csv), as a ratio to plain fedavg.
2. The checks alone: `UpdateCheck.screen` on 4 replies of the classifier and of the
   CycleGAN quick model (8.3 MB of arrays), against averaging the same replies.

    python eval/bench/bench_robust_aggregation.py --out eval_out/bench_robust
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUNS = {"fedavg, no norm check": {"strategy": "fedavg", "update_norm_factor": None},
        "fedavg (checked)": {"strategy": "fedavg"},
        "fedmedian": {"strategy": "fedmedian"},
        "fedtrimmedavg": {"strategy": "fedtrimmedavg"},
        "krum": {"strategy": "krum"}}


def round_seconds(args, out: Path, manifest: Path) -> list[dict]:
    from harmonize.cli import main as cli

    rows = []
    for name, extra in RUNS.items():
        config = yaml.safe_load((ROOT / "configs/federated/classifier-quick.yaml").read_text())
        config.update({"rounds": args.rounds, "evaluate": False, "threads_per_node": 1,
                       **extra})
        path = out / f"{name.split()[0]}_{len(rows)}.yaml"
        path.write_text(yaml.safe_dump(config))
        run = out / "runs" / path.stem
        assert cli(["federated", "-q", "--config", str(path), "--data", str(manifest),
                    "--out", str(run), "--set", "classifier.image_size=32",
                    "--set", "classifier.model.width=8"]) == 0
        seconds = pd.read_csv(run / "rounds.csv")["seconds"].diff().iloc[1:]
        rows.append({"run": name, "seconds_per_round": float(seconds.median())})
    base = rows[0]["seconds_per_round"]
    for r in rows:
        r["ratio_to_fedavg"] = r["seconds_per_round"] / base
    return rows


def check_cost(repeats: int = 5) -> list[dict]:
    from harmonize.federated.config import load_federated_config
    from harmonize.federated.tasks import build_task
    from harmonize.federated.update_checks import UpdateCheck

    models = {
        "classifier (cnn width 16)": load_federated_config(
            ROOT / "configs/federated/classifier-quick.yaml", {}),
        "cyclegan quick": load_federated_config(
            ROOT / "configs/federated/cyclegan-quick.yaml",
            {"manifest": "unused.csv", "reference_site": "site_a",
             "cyclegan.sites": ["site_b", "site_c"]})}
    rows = []
    for name, cfg in models.items():
        arrays = build_task(cfg).initial_arrays()
        replies = [(f"n{i}", {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                              for k, v in arrays.items()}) for i in range(4)]
        check = UpdateCheck(arrays, 10.0)
        started = time.perf_counter()
        for _ in range(repeats):
            check.screen(replies)
        screen = (time.perf_counter() - started) / repeats
        started = time.perf_counter()
        for _ in range(repeats):
            {k: torch.stack([r[1][k].float() for r in replies]).mean(0) for k in arrays}
        mean = (time.perf_counter() - started) / repeats
        megabytes = sum(v.numel() * v.element_size() for v in arrays.values()) / 1e6
        rows.append({"model": name, "megabytes": megabytes, "screen_s": screen,
                     "average_s": mean, "screen_over_average": screen / mean})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval_out/bench_robust")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from harmonize.synth import generate

    if not (out / "data" / "manifest.csv").exists():
        generate(out / "data", sites=4, per_site=24, size=32, seed=0, progress=False)
    result = {"checks": check_cost(),
              "rounds": round_seconds(args, out, out / "data" / "manifest.csv")}
    (out / "bench_robust.json").write_text(json.dumps(result, indent=2) + "\n")
    print(pd.DataFrame(result["checks"]).to_string(index=False))
    print(pd.DataFrame(result["rounds"]).to_string(index=False))


if __name__ == "__main__":
    main()
