"""InvalidInput: the training worker's exception when it exists (the CLI maps it to exit 2)."""

from __future__ import annotations

try:
    from ..errors import InvalidInput
except ImportError:  # pragma: no cover - before finetune_worker.errors lands

    class InvalidInput(ValueError):  # type: ignore[no-redef]
        """Invalid input (config, data or training result): permanent, exit 2."""


__all__ = ["InvalidInput"]
