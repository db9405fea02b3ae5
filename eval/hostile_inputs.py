"""1,000+ mixed good and malformed files (`harmonize.synth.hostile`, two site folders)
through `harmonize apply --model identity` and `harmonize shift-report`, each in its own
process: every valid file must be written (exactly; JPEG within 2 grey levels), every
malformed one must be an error, never ok, and neither command may abort. DICOM outputs
must add no error that dicom3tools' `dciodvfy` does not find in their input (checked when
it is installed). Prints the counts per kind, the files written with a repaired header,
the peak memory of each command, and exits 1 on any mismatch.

    python eval/hostile_inputs.py --out eval_out/hostile --files 1056
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from harmonize.data.io import read_image
from harmonize.synth.hostile import write_hostile_files

# the command in a fresh process, reporting its own peak resident memory
CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from harmonize.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_command(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True,
                          text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        return {"rc": proc.returncode, "aborted": True, "stderr": proc.stderr[-2000:]}
    return {**json.loads(lines[-1]), "aborted": False}


def dciodvfy_errors(path: Path) -> set[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return {ln for ln in (run.stdout + run.stderr).splitlines() if ln.startswith("Error")}


def new_dicom_errors(pairs: list[tuple[Path, Path]]) -> int | None:
    """DICOM outputs where dciodvfy finds an error it does not find in their input; None
    when dciodvfy is not installed."""
    if shutil.which("dciodvfy") is None:
        return None
    return sum(bool(dciodvfy_errors(out) - dciodvfy_errors(src)) for src, out in pairs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("eval_out/hostile"))
    p.add_argument("--files", type=int, default=1056)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    table = write_hostile_files(args.out, n=args.files, seed=args.seed)
    files, harmonized = args.out / "files", args.out / "harmonized"
    apply = run_command(["apply", "-q", "--model", "identity", str(files), str(harmonized)])
    shift = run_command(["shift-report", "-q", str(files), "--out", str(args.out / "shift"),
                         "--workers", "2"])
    log = pd.read_csv(harmonized / "apply_log.csv")
    log["name"] = log["input"].str.rsplit("/", n=1).str[-1]
    got = table.merge(log[["name", "status", "reason"]], on="name", how="left")
    mismatched = got[got["status"] != got["expected"]]
    off = [row.name for row in got[(got["expected"] == "ok")
                                   & (got["status"] == "ok")].itertuples()
           if np.abs(read_image(files / row.site / row.name).array.astype(float)
                     - read_image(harmonized / row.site / row.name).array.astype(float)).max()
           > (2 if row.name.endswith(".jpg") else 0)]
    written = got[got["status"] == "ok"]
    repaired = int(written["reason"].fillna("").str.startswith("source repaired").sum())
    dicom_written = [(files / r.site / r.name, harmonized / r.site / r.name)
                     for r in written.itertuples() if r.name.endswith(".dcm")]
    dciodvfy_new = new_dicom_errors(dicom_written)
    print(got.groupby(["kind", "status"]).size().to_string())
    shift_errors = (pd.read_csv(args.out / "shift" / "errors.csv")
                    if (args.out / "shift" / "errors.csv").is_file() else pd.DataFrame())
    result = {
        "files": len(got), "apply": apply, "shift_report": shift,
        "aborted": int(apply["aborted"]) + int(shift["aborted"]),
        "mismatched": len(mismatched), "silent_wrong_outputs": len(off),
        "written_with_repaired_header": repaired, "dicom_written": len(dicom_written),
        "dicom_with_new_dciodvfy_errors": dciodvfy_new,
        "shift_report_errors_listed": len(shift_errors),
        "counts": {f"{k}/{s}": int(n) for (k, s), n in got.groupby(["kind", "status"]).size()
                   .items()},
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(got)} files: {result['aborted']} aborted commands, {len(mismatched)} "
          f"mismatched, {len(off)} silent wrong outputs; apply {apply.get('seconds', 0):.1f} s "
          f"peak RSS {apply.get('peak_rss_mb', float('nan')):.0f} MB; shift-report "
          f"{shift.get('seconds', 0):.1f} s peak RSS {shift.get('peak_rss_mb', float('nan')):.0f}"
          f" MB, {len(shift_errors)} images listed as errors")
    print(f"{repaired} written with a repaired header; {len(dicom_written)} DICOM outputs, "
          + ("dciodvfy not installed" if dciodvfy_new is None else
             f"{dciodvfy_new} with a dciodvfy error their input has not"))
    if len(mismatched):
        print(mismatched[["name", "status", "reason"]].head(20).to_string())
    if off:
        print("written, but not as read:", ", ".join(off[:20]))
    return 1 if result["aborted"] or len(mismatched) or off or dciodvfy_new else 0


if __name__ == "__main__":
    sys.exit(main())
