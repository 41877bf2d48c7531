"""Errors of the environment (disk, links) that the CLI reports in one line; torch- and pandas-free."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used: the directory is missing, read-only, full, a symbolic link, or holds
    another configuration's checkpoints."""


class ExportError(OSError):
    """An export file could not be written (disk full, read-only directory); the previous file is intact."""
