"""CPU threads for the Numba kernel: how many, whether this process is a fork() child, and a
fork-safe pool of our own that splits a nogil function's range between the calling thread and
N-1 daemon threads.

Numba's `parallel=True` runs on a process-wide threading layer, OpenMP on Linux without TBB,
and GNU OpenMP does not survive fork(): a child that opens a parallel region after its parent
did is killed by numba's check or hangs (a torch op hangs there just the same). So a process
forked after `import fused_adam` runs the kernel on this module's pool instead, made anew in
each child; it keeps up with OpenMP (bench/RESULTS.md, "Kernel notes moved from code comments").
"""
import _thread
import contextlib
import os
import signal
import threading

import torch

# Below this many elements, waking a worker costs more than it saves (bench/RESULTS.md).
PARALLEL_MIN_ELEMENTS = 1 << 17


_cores = None
_forked = False  # set in every child forked after this module was imported


def forked():
    """Whether this process is a fork() child of one that imported fused_adam."""
    return _forked


def _max_threads():
    """The cores we may use, capped by torch's thread count, so that `torch.set_num_threads(1)`
    (in a DataLoader worker, say) holds here too."""
    global _cores
    if _cores is None:
        import numba  # numba.config honours NUMBA_NUM_THREADS and the affinity mask without
        # starting numba's threading layer, as numba.get_num_threads() would

        affinity = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                    else os.cpu_count() or 1)
        _cores = max(1, min(numba.config.NUMBA_NUM_THREADS, affinity))
    return max(1, min(_cores, torch.get_num_threads()))


def _worker(go, done, slot):
    while True:
        go.acquire()  # parked, without the GIL, until handed a part
        function, arguments = slot[0]
        slot[0] = None
        try:
            function(*arguments)  # nogil: runs beside the caller
        except BaseException as error:  # noqa: BLE001 - handed to the caller, which raises it
            slot[1] = error
        done.release()


class _Pool:
    """Daemon threads, each waiting on a lock for a part of the range to run."""

    def __init__(self, threads):
        self.pid = os.getpid()
        self.busy = _thread.allocate_lock()
        self.workers = []
        for index in range(threads - 1):
            go, done = _thread.allocate_lock(), _thread.allocate_lock()
            go.acquire()
            done.acquire()
            slot = [None, None]  # (function, arguments), the error it raised
            threading.Thread(target=_worker, args=(go, done, slot), daemon=True,
                             name=f"fused_adam-cpu-{index}").start()
            self.workers.append((go, done, slot))

    def run(self, function, arguments, bounds):
        """function(*arguments, bounds[i], bounds[i + 1]) for each part i; part 0 here."""
        workers = self.workers[:len(bounds) - 2]
        for index, (go, _, slot) in enumerate(workers, 1):
            slot[0] = (function, (*arguments, bounds[index], bounds[index + 1]))
            go.release()
        try:
            function(*arguments, bounds[0], bounds[1])
        finally:
            interrupted = None
            for _, done, _ in workers:  # never return while a worker still writes the buffers
                while True:
                    try:
                        done.acquire()
                        break
                    except BaseException as error:  # noqa: BLE001 - a KeyboardInterrupt
                        interrupted = error
            errors = [slot[1] for _, _, slot in workers if slot[1] is not None]
            for _, _, slot in workers:
                slot[1] = None
            if interrupted is not None:
                raise interrupted
            if errors:
                raise errors[0]


_pool = None
_pool_lock = _thread.allocate_lock()


def _after_fork_in_child():
    # The workers did not come along, and a lock may be held by a thread that no longer exists.
    global _pool, _pool_lock, _forked
    _pool, _pool_lock, _forked = None, _thread.allocate_lock(), True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _the_pool(threads):
    global _pool
    pool = _pool
    # The pid also catches a fork() made from C, which skips Python's fork hooks.
    if pool is None or pool.pid != os.getpid() or len(pool.workers) + 1 < threads:
        with _pool_lock:
            if _pool is None or _pool.pid != os.getpid() or len(_pool.workers) + 1 < threads:
                _pool = _Pool(threads)
            pool = _pool
    return pool


def parts_for(n_elements):
    """Into how many parts to split a pass over `n_elements`: one per thread allowed, or 1."""
    return _max_threads() if n_elements >= PARALLEL_MIN_ELEMENTS else 1


def run_parts(function, arguments, bounds):
    """function(*arguments, bounds[i], bounds[i + 1]) for each part i, across the pool's
    threads and this one; all on this thread when another thread's pass holds the pool."""
    parts = len(bounds) - 1
    pool = _the_pool(parts) if parts > 1 else None
    if pool is not None and pool.busy.acquire(False):
        try:
            pool.run(function, arguments, bounds)
            return
        finally:
            pool.busy.release()
    for first, last in zip(bounds[:-1], bounds[1:]):
        function(*arguments, first, last)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold back SIGINT (KeyboardInterrupt) until the block is done, in the main thread: a pass
    split across threads is several calls, and stopping between them would leave some segments
    stepped and others half-stepped. Other threads never receive it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *event: received.append(event))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):  # Python's own handler raises KeyboardInterrupt
                previous(*received[0])
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt
