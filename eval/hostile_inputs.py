"""1,000+ mixed good and malformed files through `harmonize apply --model identity`:
every valid file must be written (exactly; JPEG within 2 grey levels) and every
malformed one must be an error, never ok. Prints the counts per kind and the peak
memory; exit 1 on any mismatch.

    python eval/hostile_inputs.py --out eval_out/hostile --files 1056
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.apply import apply_translator
from harmonize.data.io import read_image
from harmonize.synth.hostile import write_hostile_files
from harmonize.translators import load_translator


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("eval_out/hostile"))
    p.add_argument("--files", type=int, default=1056)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    table = write_hostile_files(args.out, n=args.files, seed=args.seed)
    started = time.perf_counter()
    summary = apply_translator(load_translator("identity"), args.out / "files",
                               args.out / "harmonized", progress=True)
    seconds = time.perf_counter() - started
    log = pd.read_csv(args.out / "harmonized" / "apply_log.csv")
    log["name"] = log["input"].str.rsplit("/", n=1).str[-1]
    got = table.merge(log[["name", "status", "reason"]], on="name", how="left")
    mismatched = got[got["status"] != got["expected"]]
    off = []
    for row in got[(got["expected"] == "ok") & (got["status"] == "ok")].itertuples():
        a = read_image(args.out / "files" / row.name).array.astype(np.float64)
        b = read_image(args.out / "harmonized" / row.name).array.astype(np.float64)
        if np.abs(a - b).max() > (2 if row.name.endswith(".jpg") else 0):
            off.append(row.name)
    print(got.groupby(["kind", "status"]).size().to_string())
    print(f"{len(got)} files in {seconds:.1f} s; ok {summary.ok}, skipped {summary.skipped}, "
          f"errors {summary.errors}; mismatched {len(mismatched)}, values off {len(off)}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if len(mismatched):
        print(mismatched[["name", "status", "reason"]].head(20).to_string())
    return 1 if len(mismatched) or off else 0


if __name__ == "__main__":
    sys.exit(main())
