"""Where extraction chunks run: this process, local worker processes, or Ray.

All three call `extract.extract_chunk` on lists of (index, path, mask) and hand each
finished chunk to `on_chunk` in the calling process, which caches the records and moves
the progress bar (and, with local processes, extracts chunks itself too); indices put
the rows back in manifest order. A chunk whose worker dies (out of memory, a crash in a
C extension) becomes error records for its images, so a report still covers the rest.
"""

from __future__ import annotations

import logging
import multiprocessing
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import SimpleITK as sitk

from harmonize.radiomics.image_features import Item, Result, extract_chunk
from harmonize.radiomics.settings import RadiomicsSettings

OnChunk = Callable[[list[Result]], None]


def run_inline(chunks: Sequence[Sequence[Item]], settings: RadiomicsSettings,
               on_chunk: OnChunk) -> None:
    for chunk in chunks:
        on_chunk(extract_chunk(chunk, settings))


def run_processes(chunks: Sequence[Sequence[Item]], settings: RadiomicsSettings, workers: int,
                  on_chunk: OnChunk) -> None:
    """`workers - 1` spawned processes plus this one. A spawned worker needs ~0.8 s to
    start and import pyradiomics, in which this (already warm) process gets through a
    dozen images, and this process takes a chunk whenever it is free (measured on 288
    chest X-rays: 2 workers 1.87x one worker, against 1.62x with two spawned processes;
    docs/performance.md). If a helper dies, its chunks in flight become error records
    and this process does the rest. 'spawn' because the caller may hold
    threads (torch, Ray, tqdm) that a fork would copy in a locked state; as with any
    spawned pool, a calling script needs the ``if __name__ == "__main__":`` guard."""
    queue = deque(chunks)
    helpers = min(workers - 1, len(chunks) - 1)
    sitk_threads = sitk.ProcessObject_GetGlobalDefaultNumberOfThreads()
    ctx = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=max(1, helpers), mp_context=ctx) as pool:
            pending: dict[Future, Sequence[Item]] = {}
            broken: list[bool] = []

            def feed() -> None:  # two chunks per helper in flight: none waits for this one
                while queue and len(pending) < 2 * helpers and not broken:
                    chunk = queue.popleft()
                    try:
                        pending[pool.submit(extract_chunk, chunk, settings, True)] = chunk
                    except BrokenProcessPool:  # a helper died: this process does the rest
                        queue.appendleft(chunk)
                        broken.append(True)

            def collect(block: bool) -> None:
                done, _ = wait(pending, timeout=None if block else 0,
                               return_when=FIRST_COMPLETED)
                for fut in done:
                    chunk = pending.pop(fut)
                    try:
                        results = fut.result()
                    except Exception as err:  # BrokenProcessPool and the like
                        results = _failed(chunk, err)
                    on_chunk(results)

            feed()
            while queue or pending:
                if queue:  # this process works on the next chunk itself
                    on_chunk(extract_chunk(queue.popleft(), settings, True))
                if pending:
                    collect(block=not queue)
                feed()
    finally:  # extract_chunk made this process single-threaded for SimpleITK: undo it
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(sitk_threads)


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
