"""Ctrl-C stays the caller's: some libraries install a SIGINT handler and leave it installed after they return
(img2dataset.download: one that calls sys.exit(0), so Ctrl-C would end the process with status 0; Ray Train's
`fit`: one that asks a finished controller to abort). A workflow runs several stages in one process, so each
stage puts the caller's handler back when it is done."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def sigint_handler_kept():
    if threading.current_thread() is not threading.main_thread():  # only the main thread has handlers
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
