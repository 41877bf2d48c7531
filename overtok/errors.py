"""Errors of the environment (disk, links) that the CLI reports in one line; torch- and pandas-free."""

import contextlib


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used: the directory is missing, read-only, full, a symbolic link, or holds
    another configuration's checkpoints."""


class ExportError(OSError):
    """An export file could not be written (disk full, read-only directory); the previous file is intact."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler's time limit) while a command runs: handled as Ctrl-C is
    (a run ends KILLED and resumable, a sweep stops its Ray), and the command exits 143 (128 + SIGTERM)."""


_SIGTERM_RECEIVED: list[int] = []


def terminate_as_interrupt() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (call it from the main thread)."""
    import signal

    def handler(signum, frame):
        _SIGTERM_RECEIVED.append(signum)
        raise Terminated

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def sigterm_deferred():
    """SIGTERM is recorded, not raised, inside this block (for work that must not stop halfway, e.g. starting Ray:
    its processes would be left behind); on leaving it the earlier handler is back, and a SIGTERM that came
    meanwhile raises :class:`Terminated` then (once what the block started can be stopped: see its caller)."""
    import signal

    came: list[int] = []

    def record(signum, frame):
        came.append(signum)
        _SIGTERM_RECEIVED.append(signum)

    before = signal.signal(signal.SIGTERM, record)
    try:
        yield came
    finally:
        signal.signal(signal.SIGTERM, before)


def sigterm_received() -> bool:
    """Whether :func:`terminate_as_interrupt`'s handler has run: libraries that catch the interrupt (Ray Tune) may
    raise a KeyboardInterrupt of their own instead of :class:`Terminated`."""
    return bool(_SIGTERM_RECEIVED)
