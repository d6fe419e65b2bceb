"""Errors a stage raises on purpose, with a message meant for the person who ran it (no traceback needed)."""


class StageError(RuntimeError):
    """The stage stopped for a reason it can name: another run holds the output, the accounting does not add
    up, shards are missing, a regenerated selection differs. Whatever was written before stays."""
