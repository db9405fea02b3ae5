"""Overhead of the Flower simulation: wall time of a federated run vs the same local
steps run centrally in one process (each node's `task.train` in turn, weights averaged
by hand exactly as FedAvg does), measured in the same run.

    python eval/bench/bench_federated.py --nodes 4 --rounds 5

Prints the two wall times, their ratio (issue target: at most 1.3), and the setting.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import tempfile
import time
from pathlib import Path

import torch

from harmonize.data.manifest import load_manifest
from harmonize.federated.config import load_federated_config
from harmonize.federated.nodes import node_rows, split_rows
from harmonize.federated.run import run_federated
from harmonize.federated.tasks import build_task
from harmonize.synth import generate

ROOT = Path(__file__).resolve().parents[2]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-site", type=int, default=60)
    ap.add_argument("--config", default=str(ROOT / "configs/federated/classifier-quick.yaml"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "data", sites=args.nodes, per_site=args.per_site, size=64,
                 progress=False)
        cfg = load_federated_config(args.config, {
            "manifest": str(tmp / "data" / "manifest.csv"), "out": str(tmp / "run"),
            "rounds": args.rounds, "evaluate": False, "progress": False})
        summary = run_federated(cfg)
        fed = summary["wall_seconds"]
        central = central_equivalent(cfg, Path(cfg.manifest))
    print(f"{args.nodes} nodes x {args.rounds} rounds, classifier "
          f"{cfg.classifier.model.arch} at {cfg.classifier.image_size} px, "
          f"{cfg.classifier.local_epochs} local epoch(s), {args.per_site} images per node")
    print(f"federated (Flower simulation, Ray): {fed:.1f} s (strategy {summary['seconds']:.1f} s)")
    print(f"same local steps in one process:    {central:.1f} s")
    print(f"ratio federated / central: {fed / central:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
