"""Federated vs central translators on the synthetic benchmark (paired truth), several seeds.

CycleGAN (`--task cyclegan`): the central product (`train_cyclegan`, batch S x B) against
the federated CycleGAN (`harmonize federated`, Flower simulation, one node per site,
source batch B per node, reference batch S x B) at K local steps per round, K in --ks,
for the same total steps (rounds = steps / K); identity and histogram matching beside.
DDIB (`--task diffusion`): central per-site DDIB (`train_diffusion`) against federated
DDIB with local priors (each prior trained at its node, only the reference prior
travels, every node translates its own images) and with one shared site-conditioned
prior, same steps per prior.

Scores: SSIM / PSNR of every held-out non-reference image against its truth, per seed;
the table gives the mean over seeds, a 95% bootstrap CI over images (of the seed-mean
score), the per-seed means, and each method's paired difference to central (CI over
images). Also the memorization check of everything that leaves a node (translations and
F's renderings, or draws from each travelling prior, against the training images of the
site whose style they carry), bytes sent per node per round and wall time per round.
The experiment lives in `harmonize.evaluation.federated_translator_benchmark`.

    python eval/federated_translators.py --task cyclegan --seeds 0,1,2 --ks 1,5,20
    python eval/federated_translators.py --task diffusion --seeds 0,1,2
    python eval/federated_translators.py --task cyclegan --seeds 0 --ks 1 --steps 20  # smoke

Writes OUT/results.csv (one row per method and seed), OUT/summary.csv + summary.md,
OUT/per_image.csv, OUT/k_sweep.png (CycleGAN), OUT/settings.json and prints the summary.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from harmonize.evaluation.federated_translator_benchmark import (  # noqa: E402
    TASKS,
    TranslatorSettings,
    run_translator_benchmark,
)
from harmonize.evaluation.report import markdown_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=list(TASKS), default="cyclegan")
    ap.add_argument("--out", default=None, help="default: eval_out/federated_TASK")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--per-site", type=int, default=40)
    ap.add_argument("--steps", type=int, default=300, help="central optimizer steps; "
                    "federated: rounds x K")
    ap.add_argument("--batch", type=int, default=2, help="images per source node per step")
    ap.add_argument("--ks", default="1,5,20", help="CycleGAN: local steps per round")
    ap.add_argument("--local-lr", type=float, default=None)
    ap.add_argument("--server-lr-scale", choices=["1", "k"], default=None,
                    help="server Adam lr = central lr (1) or central lr x K (k)")
    ap.add_argument("--rounds", type=int, default=10, help="DDIB shared prior: rounds "
                    "(steps / rounds local steps each)")
    ap.add_argument("--parallel-nodes", type=int, default=2)
    ap.add_argument("--runs", default=None, help="training runs folder (default OUT/runs); "
                    "finished runs found there are reused, so several tables can share runs")
    args = ap.parse_args()
    settings = TranslatorSettings(
        task=args.task, out=Path(args.out or f"eval_out/federated_{args.task}"),
        seeds=[int(s) for s in args.seeds.split(",")],
        per_site=args.per_site, steps=args.steps, batch=args.batch,
        ks=[int(k) for k in args.ks.split(",") if k], local_lr=args.local_lr,
        server_lr_scale=args.server_lr_scale, rounds=args.rounds,
        parallel_nodes=args.parallel_nodes, runs=args.runs)
    torch.set_num_threads(2)
    started = time.perf_counter()
    summary = run_translator_benchmark(settings)
    record = {**vars(args), "seeds": settings.seeds, "ks": settings.ks,
              "runs": str(settings.runs), "wall_s": time.perf_counter() - started}
    (settings.out / "settings.json").write_text(json.dumps(record, indent=2))
    print(markdown_table(summary))


if __name__ == "__main__":
    main()
