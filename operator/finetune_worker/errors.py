"""Errors of the worker that map to exit codes (the CLI, run_train and run_export catch them).

One module for the whole data plane: every class a caller maps to an exit code lives here.

| class              | exit | the operator                                              |
|--------------------|------|-----------------------------------------------------------|
| InvalidInput       | 2    | Failed at once, never retried (fix the spec or the data)  |
| GateFailed         | 2    | Failed: the export scored below spec.export.evaluate.min  |
| InvalidAdapter     | 2    | Failed: the adapter changes nothing or does not fit       |
| Preempted          | 75   | a new attempt resumes; does not consume backoffLimit      |
| TransientError     | 1    | retried with backoff (consumes backoffLimit)              |
| VerificationFailed | 1    | retried: the merged export does not match its source      |
"""

from __future__ import annotations

EXIT_FAILED = 1  # any failure the operator retries (the contract names 0, 2 and 75; everything else is this)


class InvalidInput(ValueError):
    """Invalid config, data, model or training result: permanent (exit 2, never retried).

    The message names what is wrong and where (a field, a file, a column), so a user knows what to fix.
    Also for what a remote refuses for good: not found, access denied or gated, a bad revision.
    """


class Preempted(Exception):
    """The worker stopped on SIGTERM at a safe point (exit 75): training after a graceful checkpoint
    (or before its first step), export with its staging removed and any published export untouched."""


class TransientError(Exception):
    """Trouble that may pass: a network that cannot be reached, a timeout, a 5xx, a rate limit
    (exit 1, retried by the operator with backoff). The message says it was transient and what failed."""


class GateFailed(RuntimeError):
    """The export scored below spec.export.evaluate.min (permanent: exit 2)."""

    def __init__(self, message: str, metrics: dict[str, float]) -> None:
        super().__init__(message)
        self.metrics = metrics


class VerificationFailed(RuntimeError):
    """The export does not behave like the model it was made from."""


class InvalidAdapter(VerificationFailed):
    """The adapter itself is unusable: it changes nothing, or its weights do not fit the base.
    Permanent (exit 2): every retry would find the same."""
