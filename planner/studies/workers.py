"""Worker processes for sweeps and the capacity search: a pool that never outlives its use, Ctrl-C included."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A process pool that never outlives its use: on leaving (normally, on an error or on Ctrl-C) work not
    started is cancelled and the workers are terminated at once; `shutdown(wait=True)` would first wait for
    the points being planned, minutes at large GPU counts. Workers ignore SIGINT (this process handles it)
    and exit by themselves if this process dies without ending them (SIGKILL), so none is left orphaned."""
    # spawn, not fork: the parent may run threads (a progress bar) that fork would copy mid-lock.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(),))
    try:
        with _sigint_ignored():  # workers start now (one per submit) and inherit it: no traceback on Ctrl-C
            for _ in range(workers):
                pool.submit(int)
        yield pool
    finally:
        stop_pool(pool)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while workers start (they inherit it), and blocked meanwhile: a Ctrl-C in this window
    stays pending (Linux queues a blocked signal even when ignored) and reaches this process once its handler
    is back, instead of being lost while the workers plan for minutes."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (and only it receives Ctrl-C)
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started, terminate the workers (those planning too) and reap them."""
    workers = list((getattr(pool, "_processes", None) or {}).values())  # no public handle before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for w in workers:
        if w.is_alive():
            w.terminate()
    for w in workers:
        w.join(timeout=2)
        if w.is_alive():
            w.kill()
            w.join()


def _worker_init(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # already so when started from the main thread
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # inherited blocked; a pending one is dropped

    def exit_when_orphaned() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True, name="parent-watch").start()
