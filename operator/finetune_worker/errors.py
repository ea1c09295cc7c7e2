"""Errors of the worker that map to exit codes (the CLI and run_train/run_export catch them)."""

from __future__ import annotations


class InvalidInput(ValueError):
    """Invalid config, data, model or training result: permanent (exit 2, never retried).

    The message names what is wrong and where (a field, a file, a column), so a user knows what to fix.
    """


class Preempted(Exception):
    """Training stopped on SIGTERM after a graceful checkpoint (exit 75)."""
