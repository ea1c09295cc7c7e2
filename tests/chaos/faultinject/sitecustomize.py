"""Disk-full injection for worker subprocesses, with no hook in production code.

Put this directory first on PYTHONPATH and Python imports it at start-up. Inert unless
FAULT_ENOSPC_PATHS is set (comma-separated path substrings, e.g. "/checkpoints/"). Every write to a
matching path is charged against FAULT_ENOSPC_BUDGET bytes; the write that crosses the budget writes
what still fits and raises OSError(ENOSPC), as a full disk does, and so does every later one.

Covered: Python file objects (builtins.open / io.open), the fd-level calls (os.write, pwrite,
writev, sendfile, copy_file_range: shutil's fast copies and the export's safeio), torch.save and
safetensors' save_file (both write from C/Rust, so they are serialized in memory first and
written through the charged path). FAULT_ENOSPC_REPORT names a file that receives, at exit,
the bytes charged (so a test can size a budget from a clean run).
"""

from __future__ import annotations

import atexit
import builtins
import errno
import io
import os
import sys

_PATHS = [p for p in os.environ.get("FAULT_ENOSPC_PATHS", "").split(",") if p]
_BUDGET = int(os.environ.get("FAULT_ENOSPC_BUDGET", str(2**62)))
_REPORT = os.environ.get("FAULT_ENOSPC_REPORT")
_used = 0
_fired = False


def _matches(path: object) -> bool:
    try:
        text = os.fsdecode(os.fspath(path))  # type: ignore[arg-type]
    except TypeError:
        return False
    return any(p in os.path.abspath(text) for p in _PATHS)


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _charge(path: str, n: int) -> int:
    """How many of n bytes may be written to path; raises ENOSPC when none may."""
    global _used, _fired
    if not _matches(path):
        return n
    room = max(0, _BUDGET - _used)
    if room == 0 and n > 0:
        _fired = True
        raise OSError(errno.ENOSPC, "No space left on device (injected)", path)
    allowed = min(n, room)
    _used += allowed
    return allowed


class _ChargedFile:
    """A proxy for a writable file object whose writes are charged."""

    def __init__(self, f: io.IOBase, path: str) -> None:
        self._f = f
        self._path = path

    def write(self, data):  # type: ignore[no-untyped-def]
        n = len(data)
        allowed = _charge(self._path, n if isinstance(data, (bytes, bytearray, memoryview)) else len(str(data).encode()))
        if allowed < (n if isinstance(data, (bytes, bytearray, memoryview)) else len(str(data).encode())):
            if isinstance(data, (bytes, bytearray, memoryview)):
                self._f.write(bytes(data)[:allowed])
            else:
                self._f.write(str(data).encode()[:allowed].decode(errors="ignore"))
            self._f.flush()
            global _fired
            _fired = True
            raise OSError(errno.ENOSPC, "No space left on device (injected)", self._path)
        return self._f.write(data)

    def writelines(self, lines):  # type: ignore[no-untyped-def]
        for line in lines:
            self.write(line)

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        self._f.close()
        return False

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._f)

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self._f, name)


def _install() -> None:
    real_open = builtins.open

    def charged_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and not isinstance(file, int) and _matches(file):
            return _ChargedFile(f, os.path.abspath(os.fsdecode(os.fspath(file))))
        return f

    builtins.open = charged_open
    io.open = charged_open

    def fd_wrapper(real, data_index, size_of):  # type: ignore[no-untyped-def]
        def wrapped(fd, *args):  # type: ignore[no-untyped-def]
            n = size_of(args)
            path = _fd_path(fd)
            allowed = _charge(path, n)
            if allowed < n:
                if allowed > 0 and data_index is not None:
                    a = list(args)
                    a[data_index] = bytes(a[data_index])[:allowed]
                    real(fd, *a)
                global _fired
                _fired = True
                raise OSError(errno.ENOSPC, "No space left on device (injected)", path)
            return real(fd, *args)

        return wrapped

    os.write = fd_wrapper(os.write, 0, lambda a: len(a[0]))
    os.pwrite = fd_wrapper(os.pwrite, 0, lambda a: len(a[0]))
    os.writev = fd_wrapper(os.writev, None, lambda a: sum(len(b) for b in a[0]))
    os.pwritev = fd_wrapper(os.pwritev, None, lambda a: sum(len(b) for b in a[0]))

    real_sendfile, real_cfr = os.sendfile, os.copy_file_range

    def sendfile(out_fd, in_fd, offset, count):  # type: ignore[no-untyped-def]
        allowed = _charge(_fd_path(out_fd), count)
        return real_sendfile(out_fd, in_fd, offset, allowed) if allowed else 0

    def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):  # type: ignore[no-untyped-def]
        allowed = _charge(_fd_path(dst), count)
        return real_cfr(src, dst, allowed, offset_src, offset_dst) if allowed else 0

    os.sendfile, os.copy_file_range = sendfile, copy_file_range
    sys.meta_path.insert(0, _PatchOnImport())
    if _REPORT:
        atexit.register(lambda: _write_report())


def _write_report() -> None:
    with io.FileIO(_REPORT, "w") as f:  # type: ignore[arg-type]
        f.write(f'{{"charged": {_used}, "fired": {str(_fired).lower()}}}'.encode())


def _patch_torch_serialization(mod) -> None:  # type: ignore[no-untyped-def]
    real_save = mod.save

    def save(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(f, (str, bytes, os.PathLike)) and _matches(f):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            with builtins.open(f, "wb") as out:
                out.write(buf.getvalue())
            return None
        return real_save(obj, f, *args, **kwargs)

    mod.save = save


def _patch_safetensors_torch(mod) -> None:  # type: ignore[no-untyped-def]
    real_save_file = mod.save_file

    def save_file(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        if _matches(filename):
            data = mod.save(tensors, metadata=metadata)
            with builtins.open(filename, "wb") as out:
                out.write(data)
            return None
        return real_save_file(tensors, filename, metadata=metadata)

    mod.save_file = save_file


_PATCHES = {"torch.serialization": _patch_torch_serialization, "safetensors.torch": _patch_safetensors_torch}


class _PatchOnImport:
    """A meta-path finder that patches the modules above right after they execute."""

    def find_spec(self, name, path=None, target=None):  # type: ignore[no-untyped-def]
        if name not in _PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                real_exec = spec.loader.exec_module

                def exec_module(module, _real=real_exec, _name=name):  # type: ignore[no-untyped-def]
                    _real(module)
                    _PATCHES[_name](module)

                spec.loader.exec_module = exec_module  # type: ignore[method-assign]
                return spec
        return None


if _PATHS:
    _install()
