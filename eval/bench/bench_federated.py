"""Overhead of the Flower simulation: wall time of a federated run vs the same local
steps run centrally in one process (each node's `task.train` in turn, weights averaged
by hand exactly as FedAvg does), measured in the same run; and round time vs nodes.

1. Ratio (target <= 1.3): `run_federated` (Flower simulation, Ray) vs `central_equivalent`
   (2 torch threads) for --nodes x each of --rounds (default 5, and 30 as in
   eval/federated_classifier.py) of configs/federated/classifier-quick.yaml on synthetic
   data; --parallel 2 trains two nodes at once with one thread each.
   The overhead is split with the round times in rounds.csv: start-up (Ray, the node
   process, first messages) = time to the first round's replies minus its training;
   per round = round time minus the nodes' training inside it.
2. Growth: round time vs number of nodes (--growth-nodes), median of rounds 2..R.

    python eval/bench/bench_federated.py --out eval_out/bench [--parallel 2]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from harmonize.data.manifest import load_manifest, save_manifest
from harmonize.evaluation.bench_support import ROOT, linear_fit, machine, verdict, write_json
from harmonize.federated.config import load_federated_config
from harmonize.federated.nodes import node_rows, split_rows
from harmonize.federated.run import run_federated
from harmonize.federated.tasks import build_task
from harmonize.synth import generate


def central_equivalent(cfg, manifest: Path) -> float:
    """The same rounds x nodes x local training, in this process, no Flower."""
    torch.set_num_threads(cfg.threads_per_node)
    task = build_task(cfg)
    nodes = sorted(load_manifest(manifest)["node"].unique())
    rows = {n: split_rows(node_rows(manifest, n))[0] for n in nodes}
    started = time.perf_counter()
    arrays = task.initial_arrays()
    for r in range(1, cfg.rounds + 1):
        config = {"server-round": r, "nodes": len(nodes)}
        results = [task.train(arrays, None, rows[n], config)[::2] for n in nodes]
        total = sum(m["num-examples"] for _, m in results)
        arrays = {k: sum(a[k].float() * m["num-examples"] for a, m in results) / total
                  for k in arrays}
    return time.perf_counter() - started


def federated(config: str, manifest: Path, out: Path, rounds: int, parallel: int
              ) -> tuple[dict, pd.DataFrame]:
    cfg = load_federated_config(config, {"manifest": str(manifest), "out": str(out),
                                         "rounds": rounds, "evaluate": False,
                                         "progress": False, "parallel_nodes": parallel,
                                         "threads_per_node": 2 // parallel or 1})
    summary = run_federated(cfg)
    return summary, pd.read_csv(out / "rounds.csv")


def first_sites(manifest: Path, k: int, out: Path) -> Path:
    df = load_manifest(manifest)
    keep = sorted(df["site"].unique())[:k]
    path = out / f"manifest_{k}.csv"
    save_manifest(df[df["site"].isin(keep)], path)
    return path


def central_seconds(config: str, manifest: Path, rounds: int) -> float:
    cfg = load_federated_config(config, {"manifest": str(manifest), "rounds": rounds,
                                         "threads_per_node": 2})
    return central_equivalent(cfg, manifest)


def compare(config: str, manifest: Path, out: Path, nodes: int, rounds: int,
            parallel: int, central: float) -> dict:
    """One federated run against its central equivalent, the overhead split by round."""
    summary, table = federated(config, manifest, out, rounds, parallel)
    fed = summary["wall_seconds"]
    # the nodes' training inside a round: one after the other, or `parallel` at a time
    compute = table["train_compute_seconds"] * nodes / parallel
    round_time = table["seconds"].diff().fillna(table["seconds"])
    run = {"rounds": rounds, "federated_seconds": fed, "strategy_seconds": summary["seconds"],
           "central_seconds": central, "ratio": fed / central,
           "outside_strategy_s": fed - summary["seconds"],
           "first_round_s": float(round_time.iloc[0]),
           "first_round_compute_s": float(compute.iloc[0]),
           "later_round_s_median": float(round_time.iloc[1:].median()),
           "later_round_compute_s_median": float(compute.iloc[1:].median()),
           "central_per_round_s": central / rounds}
    print(f"{nodes} nodes x {rounds} rounds: federated {fed:.1f} s (Ray start/stop "
          f"{run['outside_strategy_s']:.1f} s; first round {run['first_round_s']:.1f} s, "
          f"{run['first_round_compute_s']:.1f} s of it training; later rounds "
          f"{run['later_round_s_median']:.2f} s, {run['later_round_compute_s_median']:.2f} s "
          f"training) vs central {central:.1f} s ({run['central_per_round_s']:.2f} s per round)"
          f": ratio {run['ratio']:.2f} {verdict(run['ratio'], 1.3, at_most=True)}")
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("eval_out/bench"))
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rounds", type=int, nargs="+", default=[5, 30],
                    help="round counts to compare (30: the federated classifier study)")
    ap.add_argument("--per-site", type=int, default=60)
    ap.add_argument("--growth-nodes", type=int, nargs="*", default=[2, 4, 6, 8])
    ap.add_argument("--growth-rounds", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=1, choices=[1, 2],
                    help="nodes training at once in the simulation (2: one thread each); "
                         "the central run always uses 2 threads")
    ap.add_argument("--config", default=str(ROOT / "configs/federated/classifier-quick.yaml"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sites = max([args.nodes, *args.growth_nodes])
        generate(tmp / "data", sites=sites, per_site=args.per_site, size=64, progress=False)
        manifest = first_sites(tmp / "data" / "manifest.csv", args.nodes, tmp)
        # central runs first: Ray's processes take a few seconds to go after a run, and
        # must not slow the baseline down
        central = {r: central_seconds(args.config, manifest, r) for r in args.rounds}
        runs = [compare(args.config, manifest, tmp / f"run_r{r}", args.nodes, r, args.parallel,
                        central[r]) for r in args.rounds]
        growth = []
        for k in args.growth_nodes:
            _, r = federated(args.config, first_sites(tmp / "data" / "manifest.csv", k, tmp),
                             tmp / f"run{k}", args.growth_rounds, args.parallel)
            later = r.iloc[1:]
            growth.append({"nodes": k, "round_seconds": float(later["seconds"].diff()
                                                              .dropna().median()
                                                              if len(later) > 1 else
                                                              r["seconds"].diff().iloc[-1]),
                           "compute_seconds": float(later["train_compute_seconds"].median()
                                                    * k / args.parallel)})
            print(f"{k} nodes: {growth[-1]['round_seconds']:.2f} s per round "
                  f"({growth[-1]['compute_seconds']:.2f} s of it local training)")
    cfg = load_federated_config(args.config)
    result = {
        "setting": {"nodes": args.nodes, "images_per_node": args.per_site,
                    "config": Path(args.config).name,
                    "classifier": f"{cfg.classifier.model.arch} width {cfg.classifier.model.width}"
                                  f" at {cfg.classifier.image_size} px",
                    "local_epochs": cfg.classifier.local_epochs,
                    "parallel_nodes": args.parallel,
                    "threads_per_node": 2 // args.parallel, "central_threads": 2},
        "runs": runs, "machine": machine(),
    }
    suffix = "" if args.parallel == 1 else f"_parallel{args.parallel}"
    if len(growth) >= 2:
        g = pd.DataFrame(growth)
        args.out.mkdir(parents=True, exist_ok=True)
        g.to_csv(args.out / f"federated_nodes{suffix}.csv", index=False)
        slope, intercept = linear_fit(g["nodes"], g["round_seconds"])
        result["growth"] = {"rows": growth, "seconds_per_node": slope,
                            "fixed_seconds_per_round": intercept}
        print(f"round time vs nodes: {slope:.2f} s per node + {intercept:.2f} s")
    write_json(args.out / f"federated{suffix}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
