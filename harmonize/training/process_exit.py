"""How a training process ends under `torchrun` / `accelerate launch`.

Gloo keeps C++ worker threads alive until the interpreter tears itself down; now and then
one of them is destroyed while still joinable and aborts the process ("terminate called
without an active exception", SIGABRT) after the run has finished and saved: 1 two-process
CUT run in 76 here, 1 in 150 on another machine, and on CI. torchrun then reports the
whole run as failed. So a process that holds a process group meets the others (when it
succeeded), destroys the group while the interpreter is fully alive, flushes its output
and leaves with `os._exit`, skipping the finalization where the abort happens. A process
without a group (one process, or `harmonize apply` sharding files) returns its code.
"""

from __future__ import annotations

import os
import sys


def end_process(code: int) -> int:
    """Return `code`, or, in a process group, leave with it now.

    A failed process (code != 0) leaves without waiting: its peers may never reach the
    barrier, and the launcher stops them when one process fails."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return code
    if code == 0 and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
