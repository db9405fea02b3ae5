"""Privacy vs quality of federated harmonization: patient-level DP-SGD at each node
(`privacy.mode: patient-dp`) at epsilon per patient in --epsilons (inf = no DP), seeds.

- `--task ddib`: federated DDIB with local priors on the synthetic benchmark (4 sites x
  --per-site patients, 64 px, paired truth). Only the reference prior leaves its node, so
  only it trains with DP-SGD. Score: SSIM of every held-out non-reference image to its
  truth; share of the non-private gain over identity = (SSIM - identity) / (SSIM at inf
  - identity). Non-private runs are reused from --runs (eval/federated_translators.py's).
- `--task cyclegan`: the federated CycleGAN at K = 1 (all four networks DP-SGD trained
  at every node), same data and score; non-private runs reused from --runs.
- `--task histogram`: federated histogram matching (the reference node releases
  --landmarks intensity quantiles once, with the Gaussian mechanism under DP), same data
  and score.
- `--task classifier`: the federated CNN (GroupNorm, as DP-SGD needs) over 3 sites' nodes;
  AUC on their held-out patients and on the unseen 4th site.

CIs: 95% bootstrap over images of the seed-mean score (SSIM) or of the seed-mean AUC
(`classify.metrics.bootstrap_mean_auc`: stratified, every seed's model scored on each
resample); each seed's own interval in results.csv. delta 1e-5 (below 1 / patients at
every node). The experiment lives in `harmonize.evaluation.privacy_benchmark`.

    python eval/federated_privacy.py --task ddib --seeds 0,1,2 --runs eval_out/fed_ddib/runs
    python eval/federated_privacy.py --task classifier --seeds 0,1,2

Writes OUT/results.csv (per method, epsilon, seed), OUT/summary.csv / summary.md, the
plot OUT/epsilon_quality.png, and prints the summary.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from harmonize.evaluation.privacy_benchmark import (  # noqa: E402
    TASKS,
    PrivacySettings,
    plot_combined,
    run_privacy_benchmark,
)
from harmonize.evaluation.report import markdown_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=list(TASKS), default="ddib")
    ap.add_argument("--out", default=None, help="default: eval_out/privacy_TASK")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epsilons", default="inf,50,10,3")
    ap.add_argument("--per-site", type=int, default=None, help="default: 40 (ddib), "
                    "100 (classifier)")
    ap.add_argument("--steps", type=int, default=None, help="ddib: steps of each prior "
                    "(default 200); cyclegan: rounds at K = 1 (default 300)")
    ap.add_argument("--patients-per-step", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=10, help="classifier rounds")
    ap.add_argument("--landmarks", type=int, default=8, help="histogram: landmarks")
    ap.add_argument("--parallel-nodes", type=int, default=2)
    ap.add_argument("--runs", default=None, help="runs folder (default OUT/runs); "
                    "finished runs there are reused")
    ap.add_argument("--combine", nargs="+", default=None, metavar="DIR",
                    help="only draw the combined figure of finished outputs to --out (a PNG)")
    args = ap.parse_args()
    if args.combine:
        plot_combined([Path(d) for d in args.combine], Path(args.out))
        return
    settings = PrivacySettings(
        task=args.task, out=Path(args.out or f"eval_out/privacy_{args.task}"),
        seeds=[int(s) for s in args.seeds.split(",")],
        epsilons=[float(e) for e in args.epsilons.split(",")],
        per_site=args.per_site, steps=args.steps, patients_per_step=args.patients_per_step,
        rounds=args.rounds, landmarks=args.landmarks, parallel_nodes=args.parallel_nodes,
        runs=args.runs)
    torch.set_num_threads(2)
    started = time.perf_counter()
    _, table = run_privacy_benchmark(settings)
    record = {**vars(args), "seeds": settings.seeds, "epsilons": settings.epsilons,
              "per_site": settings.per_site, "steps": settings.steps,
              "runs": str(settings.runs), "wall_s": time.perf_counter() - started}
    (settings.out / "settings.json").write_text(json.dumps(record, indent=2))
    print(markdown_table(table))


if __name__ == "__main__":
    main()
