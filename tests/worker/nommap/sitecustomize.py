"""A filesystem that cannot mmap (errno 19, as on some NFS/FUSE/CSI volumes), for worker subprocesses.

Put this directory first on PYTHONPATH: Python imports it at start-up, before any library, and it
replaces safetensors' memory-mapping entry points (safe_open, and load_file which uses it) with ones
that raise OSError(ENODEV) for files under FAULT_ENODEV_PATHS (comma-separated path substrings).
Reading a file's bytes (`safetensors.torch.load(data)`) still works, as it does on such a volume.
Inert when FAULT_ENODEV_PATHS is unset.
"""

from __future__ import annotations

import errno
import os

_PATHS = [p for p in os.environ.get("FAULT_ENODEV_PATHS", "").split(",") if p]


def _blocked(path: object) -> bool:
    try:
        text = os.path.abspath(os.fsdecode(os.fspath(path)))  # type: ignore[arg-type]
    except TypeError:
        return False
    return any(p in text for p in _PATHS)


if _PATHS:
    import safetensors
    import safetensors.torch

    _safe_open, _load_file = safetensors.safe_open, safetensors.torch.load_file

    def safe_open(filename, *args, **kwargs):  # type: ignore[no-untyped-def]
        if _blocked(filename):
            raise OSError(errno.ENODEV, "No such device (os error 19, injected)")
        return _safe_open(filename, *args, **kwargs)

    def load_file(filename, *args, **kwargs):  # type: ignore[no-untyped-def]
        if _blocked(filename):
            raise OSError(errno.ENODEV, "No such device (os error 19, injected)")
        return _load_file(filename, *args, **kwargs)

    safetensors.safe_open = safe_open
    safetensors.torch.safe_open = safe_open
    safetensors.torch.load_file = load_file
