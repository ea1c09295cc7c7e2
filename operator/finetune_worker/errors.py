"""Errors of the worker that map to exit codes (the CLI and run_train/run_export catch them)."""

from __future__ import annotations


class InvalidInput(ValueError):
    """Invalid config, data, model or training result: permanent (exit 2, never retried).

    The message names what is wrong and where (a field, a file, a column), so a user knows what to fix.
    """


class Preempted(Exception):
    """The worker stopped on SIGTERM at a safe point (exit 75): training after a graceful checkpoint
    (or before its first step), export with its staging removed and any published export untouched."""
