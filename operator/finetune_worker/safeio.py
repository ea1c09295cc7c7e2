"""safetensors I/O that works where memory-mapping does not.

Streaming reads use `os.pread` at the offsets in the file header, so the merge never maps a
file at all and never holds more than one tensor of the input. Whole-file loads (an adapter,
a small model) try safetensors' memory-mapped loader first and, when the filesystem refuses
mmap with `OSError: No such device (os error 19)` (some network filesystems), read the file
into memory instead and say so once in the log.

Writing is streaming too: `ShardWriter` lays out the header first (offsets are known from the
shapes) and then appends each tensor's bytes, copying untouched tensors file-to-file in the
kernel (`os.copy_file_range`) where it can.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

# safetensors dtype names -> (torch dtype name, item size in bytes)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
_MAX_HEADER = 100 * 1024 * 1024
mmap_fallbacks: list[str] = []  # files read into memory because mmap failed (reported in metadata)


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. F32
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in file
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1] if self.dtype in DTYPES else 1


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header with plain reads (no mmap). Returns (tensors, __metadata__)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise SafetensorsError(f"{path}: header length {n} is implausible")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise SafetensorsError(f"{path}: unreadable header: {e}") from None
    size = path.stat().st_size
    base = 8 + n
    meta = header.pop("__metadata__", None) or {}
    out: dict[str, TensorInfo] = {}
    for name, h in header.items():
        s, e = h["data_offsets"]
        if not 0 <= s <= e or base + e > size:
            raise SafetensorsError(f"{path}: tensor {name} lies outside the file (truncated?)")
        out[name] = TensorInfo(name, h["dtype"], tuple(h["shape"]), path, base + s, e - s)
    return out, meta


def read_tensor(info: TensorInfo, fd: int | None = None, scratch: bytearray | None = None) -> Any:
    """One tensor, read with pread. Into `scratch` when given (reused between tensors: the
    returned tensor is only valid until the next read into it), else into its own buffer."""
    import torch

    buf = memoryview(scratch)[: info.nbytes] if scratch is not None else bytearray(info.nbytes)
    own = fd is None
    if own:
        fd = os.open(info.file, os.O_RDONLY)
    try:
        view, done = memoryview(buf), 0
        while done < info.nbytes:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [view[done:]], info.start + done)
            else:  # platforms without preadv (older macOS)
                chunk = os.pread(fd, info.nbytes - done, info.start + done)
                n = len(chunk)
                view[done : done + n] = chunk
            if n <= 0:
                raise SafetensorsError(f"{info.file}: unexpected end of file reading {info.name}")
            done += n
    finally:
        if own:
            os.close(fd)
    dtype = getattr(torch, DTYPES[info.dtype][0])
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def load_file(path: Path) -> dict[str, Any]:
    """Load a whole safetensors file on CPU; on errno 19 (no mmap here) read it into memory."""
    from safetensors.torch import load
    from safetensors.torch import load_file as mmap_load

    try:
        return mmap_load(str(path), device="cpu")
    except OSError as e:
        if e.errno != errno.ENODEV:
            raise
        note_mmap_fallback(path, e)
        return load(Path(path).read_bytes())


def without_mmap_on_enodev(load: Callable[[], T], fallback: Callable[[], T], path: str | Path) -> T:
    """`load()`; where it fails because the filesystem cannot memory-map (errno 19, anywhere in the
    cause chain), note that once for `path` and return `fallback()`, which reads without mmap."""
    try:
        return load()
    except Exception as e:
        if not is_enodev(e):
            raise
        note_mmap_fallback(path, e)
        return fallback()


def note_mmap_fallback(path: str | Path, err: BaseException) -> None:
    if str(path) not in mmap_fallbacks:
        mmap_fallbacks.append(str(path))
        log.warning("memory-mapping %s failed (%s); reading it into memory instead", path, err)


def is_enodev(err: BaseException) -> bool:
    """True when err (or its cause chain) is errno 19: the filesystem does not support mmap."""
    while err is not None:
        if isinstance(err, OSError) and (err.errno == errno.ENODEV or "os error 19" in str(err)):
            return True
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return False


class ShardWriter:
    """Write one safetensors file whose tensor list is known up front, tensor by tensor.

    Tensors are laid out by (item size descending, name), as safetensors does, so every
    tensor starts aligned to its item size. Call `put_tensor`/`copy_from` for every planned
    tensor; in `order` is fastest (sequential writes), any order is correct.
    """

    def __init__(
        self,
        path: Path,
        tensors: Iterable[tuple[str, str, tuple[int, ...], int]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        plan = sorted(tensors, key=lambda t: (-DTYPES.get(t[1], ("", 1))[1], t[0]))
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self.slots: dict[str, tuple[int, int]] = {}
        for name, dtype, shape, nbytes in plan:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.slots[name] = (offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.size = self.data_start + offset
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self.fd, struct.pack("<Q", len(raw)) + raw)
        self.order = [t[0] for t in plan]  # writing in this order fills the file front to back, no holes
        self.written: set[str] = set()

    def put_tensor(self, name: str, tensor: Any) -> None:
        off, nbytes = self.slots[name]
        t = tensor.detach().contiguous().cpu()
        data = t.view(-1).view(dtype=__import__("torch").uint8).numpy() if t.numel() else b""
        if len(data) != nbytes:
            raise SafetensorsError(f"{name}: {len(data)} bytes, expected {nbytes}")
        self._pwrite_all(memoryview(data).cast("B") if nbytes else memoryview(b""), self.data_start + off)
        self.written.add(name)

    def copy_from(self, name: str, src: TensorInfo, src_fd: int) -> None:
        """Copy a tensor's bytes from another safetensors file, in the kernel where possible."""
        off, nbytes = self.slots[name]
        if nbytes != src.nbytes:
            raise SafetensorsError(f"{name}: source holds {src.nbytes} bytes, expected {nbytes}")
        done = 0
        try:
            if not hasattr(os, "copy_file_range"):  # not Linux: copy through user space
                raise OSError(errno.ENOSYS, "copy_file_range unavailable")
            while done < nbytes:
                n = os.copy_file_range(
                    src_fd, self.fd, nbytes - done, src.start + done, self.data_start + off + done
                )
                if n <= 0:
                    raise OSError(errno.EIO, "copy_file_range made no progress")
                done += n
        except OSError:
            chunk = 16 * 1024 * 1024
            while done < nbytes:
                data = os.pread(src_fd, min(chunk, nbytes - done), src.start + done)
                if not data:
                    raise SafetensorsError(f"{src.file}: unexpected end of file reading {name}") from None
                self._pwrite_all(memoryview(data), self.data_start + off + done)
                done += len(data)
        self.written.add(name)

    def _pwrite_all(self, data: memoryview, at: int) -> None:
        while len(data):
            n = os.pwrite(self.fd, data, at)
            data, at = data[n:], at + n

    def close(self) -> None:
        missing = set(self.slots) - self.written
        if not missing and os.fstat(self.fd).st_size != self.size:
            missing = {"(file size mismatch)"}
        if missing:
            os.close(self.fd)
            raise SafetensorsError(f"{self.path}: tensors never written: {sorted(missing)[:5]}")
        os.fsync(self.fd)
        os.close(self.fd)
