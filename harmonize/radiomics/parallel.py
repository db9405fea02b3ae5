"""Where extraction chunks run: this process, local worker processes, or Ray.

All three call `extract.extract_chunk` on lists of (index, path, mask) and hand each
finished chunk to `on_chunk` in the calling process, which caches the records and
moves the progress bar; indices put the rows back in manifest order. A chunk whose
worker dies (out of memory, a crash in a C extension) becomes error records for its
images, so a report still covers the rest.
"""

from __future__ import annotations

import logging
import multiprocessing
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from harmonize.radiomics.extract import Item, Result, extract_chunk
from harmonize.radiomics.settings import RadiomicsSettings

OnChunk = Callable[[list[Result]], None]


def run_inline(chunks: Sequence[Sequence[Item]], settings: RadiomicsSettings,
               on_chunk: OnChunk) -> None:
    for chunk in chunks:
        on_chunk(extract_chunk(chunk, settings))


def run_processes(chunks: Sequence[Sequence[Item]], settings: RadiomicsSettings, workers: int,
                  on_chunk: OnChunk) -> None:
    """A process pool; 'spawn' because the caller may hold threads (torch, Ray, tqdm)
    that a fork would copy in a locked state. Workers start in about a second; as with
    any spawned pool, a calling script needs the ``if __name__ == "__main__":`` guard."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
        pending: dict[Future, Sequence[Item]] = {
            pool.submit(extract_chunk, chunk, settings, True): chunk for chunk in chunks
        }
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                chunk = pending.pop(fut)
                try:
                    results = fut.result()
                except Exception as err:  # BrokenProcessPool and the like
                    results = _failed(chunk, err)
                on_chunk(results)


def run_ray(chunks: Sequence[Sequence[Item]], settings: RadiomicsSettings, address: str,
            workers: int, on_chunk: OnChunk) -> None:
    """One Ray task per chunk. address "local" starts a private local Ray with `workers`
    CPUs (shut down afterwards); otherwise connect with ``ray.init(address=...)``. An
    already initialized Ray is used as it is. Ray is imported here: it is slow to load."""
    import ray

    started = False
    if not ray.is_initialized():
        kwargs = {"log_to_driver": False, "logging_level": logging.WARNING}
        if address == "local":
            kwargs.update(num_cpus=workers, include_dashboard=False)
        else:
            kwargs.update(address=address)
        with warnings.catch_warnings():  # Ray's note on GPU env vars: CPU tasks only here
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(**kwargs)
        started = True
    try:
        task = ray.remote(num_cpus=1)(extract_chunk)
        pending = {task.remote(list(chunk), settings, True): chunk for chunk in chunks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                chunk = pending.pop(ref)
                try:
                    results = ray.get(ref)
                except Exception as err:  # a worker died or the task could not run
                    results = _failed(chunk, err)
                on_chunk(results)
    finally:
        if started:
            ray.shutdown()


def _failed(chunk: Sequence[Item], err: BaseException) -> list[Result]:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    msg = f"worker failed ({type(err).__name__}: {first})"
    if isinstance(err, BrokenProcessPool):
        msg += ("; a worker process died (out of memory?), or a script called extraction "
                "outside `if __name__ == '__main__':` (worker processes are spawned and "
                "import the main script)")
    return [(index, None, msg) for index, _, _ in chunk]
