"""How a training process ends under `torchrun` / `accelerate launch`.

Gloo keeps C++ worker threads alive until the interpreter tears itself down; now and then
one of them is destroyed while still joinable and aborts the process ("terminate called
without an active exception", SIGABRT) after the run has finished and saved: 1 two-process
CUT run in 76 here, and on CI. torchrun then reports the whole run as failed. So a
successful process meets the others, destroys the process group while the interpreter is
fully alive, flushes its output and leaves with `os._exit`, skipping the finalization
where the abort happens. One process (no WORLD_SIZE) returns its code unchanged.
"""

from __future__ import annotations

import os
import sys


def launched_processes() -> int:
    """How many processes torchrun / accelerate launch started (1 when run directly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def end_process(code: int) -> int:
    """Return `code` for one process; under a multi-process launch, leave with it now.

    A failed process (code != 0) leaves without waiting: its peers may never reach the
    barrier, and the launcher stops them when one process fails."""
    if launched_processes() <= 1:
        return code
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
