"""Publish a complete staging directory under its final name, replacing an older one without a gap.

POSIX cannot rename a directory over a non-empty one, so a plain "move the old one aside, rename
the new one in" leaves a moment where neither is published. Where Linux offers
`renameat2(RENAME_EXCHANGE)` (ext4, xfs, btrfs, tmpfs, overlayfs) the two are swapped in one
step instead: every reader sees the old directory or the new one, and a kill at any instant
leaves one of them published. Elsewhere (NFS and other network filesystems answer EINVAL) the
fallback moves the old one aside first; a kill between its two renames leaves only the aside
copy, and `restore_aside` — which every start runs before it cleans staging — renames it back.
So no rerun ever finds the old result gone; only a reader racing the fallback's two renames can
see the name missing for that instant.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.4
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step. False (nothing changed) where the kernel or filesystem can't."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def fsync_tree(path: Path) -> None:
    """Flush every file under path, and the directories, to disk (a rename is only as durable as its contents)."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(
    staging: Path, final: Path, aside: Path, *, on_aside: Callable[[], None] | None = None
) -> None:
    """Make the complete directory `staging` visible as `final`, replacing any older `final`.

    Args:
        staging: the finished directory, on the same filesystem as `final`.
        final: the published name.
        aside: where the fallback parks the older `final` between its two renames; its name must
            be one the caller's start-up hands to `restore_aside` before it cleans staging.
        on_aside: called once the older one is parked (the fallback only; a test hook).
    """
    fsync_tree(staging)
    if final.exists():
        if exchange(staging, final):  # `staging` now holds the older one
            fsync_dir(final.parent)
            shutil.rmtree(staging, ignore_errors=True)
            return
        os.replace(final, aside)
        if on_aside is not None:
            on_aside()
    os.replace(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def restore_aside(
    final: Path, aside_prefix: str, complete: Callable[[Path], bool] | None = None
) -> str | None:
    """Undo a fallback `replace_dir` killed between its renames: with `final` missing, rename the newest
    complete directory named `aside_prefix*` (in final's directory) back. Returns its name, else None.
    Leftover aside copies are the caller's to remove with the rest of its staging."""
    parent = final.parent
    if final.exists() or not parent.is_dir():
        return None
    parked = [p for p in parent.iterdir() if p.name.startswith(aside_prefix) and p.is_dir()]
    for p in sorted(parked, key=lambda p: p.stat().st_mtime, reverse=True):
        if complete is None or complete(p):
            os.replace(p, final)
            fsync_dir(parent)
            return p.name
    return None
