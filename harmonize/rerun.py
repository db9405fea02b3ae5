"""Say so before a run replaces what an earlier run wrote (a checkpoint trained for
another reference site, a folder of harmonized images, a report): a rerun into the same
folder is allowed, but never silent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from harmonize.configs import ConfigError


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def replacing_checkpoint(out: Path, kind: str, reference_site: str) -> None:
    meta_path = Path(out) / "metadata.json"
    if not meta_path.is_file():
        return
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    old_ref = meta.get("reference_site")
    text = f"replacing the {meta.get('kind', 'earlier')} checkpoint in {out}"
    if old_ref is not None and str(old_ref) != str(reference_site):
        text += (f", trained for reference site '{old_ref}', with a {kind} checkpoint for "
                 f"'{reference_site}'")
    note(text)


def replacing_outputs(out: Path, what: str, marker: str | None = None) -> None:
    """`out` already holds files (or `marker` in it, e.g. report.html)."""
    out = Path(out)
    if not out.is_dir():
        return
    if marker is not None:
        if (out / marker).exists():
            note(f"{out} holds an earlier {what}; it is replaced")
        return
    n = sum(1 for p in out.rglob("*") if p.is_file())
    if n:
        note(f"{out} already holds {n} file(s); {what} with the same names are replaced "
             "(--resume keeps them)")


def output_folder(out, what: str, marker: str) -> Path:
    """The folder a command writes to (`--out`, required), created; an earlier run's
    `marker` there is noted as replaced."""
    if out is None:
        raise ConfigError("out is required (--out DIR)")
    out = Path(out)
    replacing_outputs(out, what, marker=marker)
    out.mkdir(parents=True, exist_ok=True)
    return out
