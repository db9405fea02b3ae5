"""How a training process ends under `torchrun` / `accelerate launch`.

Now and then a process that has finished and saved aborts while it tears down ("terminate
called without an active exception", SIGABRT: a C++ thread of gloo or of Python's
finalization ends badly), and torchrun reports the whole run as failed. So a process
that holds a process group meets the others (when it succeeded), destroys the group while
the interpreter is fully alive, flushes its output and leaves with `os._exit`, skipping
the finalization. Measured on two-process CPU CUT runs (tests/test_distributed.py): 2
aborts in 226 runs before, 1 in 524 after. Rarer, not gone: the remaining abort comes
after this function has flushed the output. A process without a group (one process, or
`harmonize apply` sharding files) returns its code.
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
