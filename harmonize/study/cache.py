"""One run cache for every stage of a study: a stage's folder holds `stage.json` with the
hash of everything that determines its result (its resolved inputs); a rerun with the
same inputs reuses the folder, any change reruns that stage only."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harmonize.data.io import atomic_write

STAGE_FILE = "stage.json"


def stage_key(inputs: Any) -> str:
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageCache:
    def __init__(self, root: Path, progress: bool = True) -> None:
        self.root, self.progress = Path(root), progress
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []  # stages an earlier run had done
        self._done: dict[tuple[str, str], dict] = {}  # stages this run has done

    def run(self, name: str, inputs: Any, work: Callable[[Path], dict]) -> dict:
        """`work(folder)` -> a JSON-able result, unless the folder already holds the
        result of the same inputs."""
        folder = self.root / name
        key = stage_key(inputs)
        if (name, key) in self._done:  # asked again in this run (e.g. a shared input)
            return self._done[(name, key)]
        record = folder / STAGE_FILE
        if record.is_file():
            saved = json.loads(record.read_text())
            if saved.get("key") == key:
                self.reused.append(name)
                self.seconds[name] = saved.get("seconds", 0.0)
                if self.progress:
                    print(f"  {name}: reused (same inputs as the earlier run)", flush=True)
                self._done[(name, key)] = saved["result"]
                return saved["result"]
        shutil.rmtree(folder, ignore_errors=True)  # another or an unfinished run
        folder.mkdir(parents=True)
        started = time.perf_counter()
        if self.progress:
            print(f"  {name} ...", flush=True)
        result = work(folder)
        seconds = time.perf_counter() - started
        self.seconds[name] = seconds
        text = json.dumps({"key": key, "inputs": inputs, "seconds": seconds,
                           "result": result}, indent=2, default=str) + "\n"
        atomic_write(record, lambda tmp: tmp.write_text(text))
        self._done[(name, key)] = result
        return result
