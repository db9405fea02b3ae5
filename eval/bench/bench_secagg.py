"""What SecAgg+ costs: the same federated classifier run with the plain FedAvg app
(`run_federated`) and with SecAgg+ (`privacy.secagg`), same config and seed, on
synthetic data; seconds of the first round (from the strategy's start: node start-up,
then the round), seconds per later round (between consecutive rounds' aggregates),
the bytes each node sends per round, and the largest difference between the two final
models (the quantization error; float32 rounding at ~1e-7).

    python eval/bench/bench_secagg.py --out eval_out/bench/secagg.csv [--rounds 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import tempfile
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file

from harmonize.evaluation.bench_support import ROOT, machine
from harmonize.federated.config import load_federated_config
from harmonize.federated.run import run_federated
from harmonize.synth import generate


def one_run(mode: str, args, manifest: Path, out: Path) -> dict:
    cfg = load_federated_config(args.config, {
        "manifest": str(manifest), "out": str(out), "rounds": args.rounds,
        "evaluate": False, "progress": False, "threads_per_node": 1,
        "classifier.image_size": args.image_size, "classifier.local_epochs": 1,
        "classifier.model.width": args.width})
    cfg.privacy.secagg = mode == "secagg"
    summary = run_federated(cfg)
    rounds = pd.read_csv(out / "rounds.csv")
    later = rounds["seconds"].diff().iloc[1:]
    weights = load_file(out / "shared_weights.safetensors")
    return {"mode": mode, "nodes": summary["nodes"], "rounds": args.rounds,
            "image_size": args.image_size, "width": args.width,
            "params": sum(v.numel() for k, v in weights.items()
                          if not k.endswith("num_batches_tracked")),
            "round1_seconds": float(rounds["seconds"].iloc[0]),
            "seconds_per_later_round": float(later.mean()) if len(later) else None,
            "run_seconds": summary["seconds"], "wall_seconds": summary["wall_seconds"],
            "node_compute_seconds": float(rounds["train_compute_seconds"].mean()),
            "bytes_sent_per_node": float(rounds["train_bytes_sent"].iloc[0]),
            "weights": out / "shared_weights.safetensors"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="CSV to write")
    ap.add_argument("--config", default=str(ROOT / "configs/federated/classifier-quick.yaml"))
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--per-site", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "synth", sites=args.nodes, per_site=args.per_site,
                 size=args.image_size, seed=0, progress=False)
        manifest = tmp / "synth" / "manifest.csv"
        rows = [one_run(mode, args, manifest, tmp / mode) for mode in ("plain", "secagg")]
        a, b = (load_file(r.pop("weights")) for r in rows)
        diff = max(float((a[k].double() - b[k].double()).abs().max())  # float arrays
                   for k in b if b[k].is_floating_point())  # (plain turns ints to floats)
    for r in rows:
        r["max_abs_diff_vs_plain"] = diff
        r["load_1min"] = machine()["load_1min"]
    df = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df.to_string(index=False))
    p, s = rows
    if p["seconds_per_later_round"] and s["seconds_per_later_round"]:
        print(f"SecAgg+: {s['seconds_per_later_round']:.2f} s per round vs "
              f"{p['seconds_per_later_round']:.2f} s plain "
              f"({s['seconds_per_later_round'] / p['seconds_per_later_round']:.2f}x), "
              f"{s['bytes_sent_per_node'] / p['bytes_sent_per_node']:.1f}x the bytes; "
              f"models differ by at most {diff:.3g}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
