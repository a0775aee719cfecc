"""Signals during training: SIGTERM as an interrupt, none inside a checkpoint write."""

from __future__ import annotations

import contextlib
import os
import signal
import threading


@contextlib.contextmanager
def signals_deferred():
    """Holds SIGTERM and SIGINT until the block ends, then delivers the last one held.

    Python runs signal handlers in the main thread between bytecodes, so a handler that
    raises could interrupt a checkpoint write half-way; during the block, handlers only
    record the signal.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals (and may set handlers)
        return
    held = []
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            handler = previous[held[-1]]
            if callable(handler):
                handler(held[-1], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), held[-1])


def raise_interrupt(signum, frame):
    """A signal handler that raises `KeyboardInterrupt` (the trainer's SIGTERM: the run
    saves its step and stops as on Ctrl-C)."""
    raise KeyboardInterrupt(f"signal {signum}")
