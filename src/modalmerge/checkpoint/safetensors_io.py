"""The safetensors format, read and written without holding a model in memory.

Reading parses the header once and fetches each tensor (or any flat element range of it) with
positioned reads into a fresh buffer: only the bytes asked for ever enter the process, and the
page cache does not count against the merge's resident memory the way a long-lived map of
several multi-GB files would. Writing lays out the header first, from the planned names,
dtypes and shapes, and then writes each tensor's bytes at its offset as it is produced, so an
output shard is never assembled in memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class SafetensorsFile:
    """One .safetensors file: validated header, positioned reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise MergeError(f"{self.path}: cannot open ({e.strerror}); check the path") from None
        size = os.fstat(self._fd).st_size
        where = f"{self.path}:"
        if size < 8:
            raise MergeError(f"{where} not a safetensors file ({size} bytes); re-save or re-download it")
        (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if header_len > min(size - 8, _MAX_HEADER):
            raise MergeError(f"{where} corrupt or truncated header (says {header_len} bytes, file has {size}); "
                             "re-save or re-download it")
        try:
            header = json.loads(os.pread(self._fd, header_len, 8))
        except (ValueError, UnicodeDecodeError):
            raise MergeError(f"{where} corrupt header (not JSON); re-save or re-download it") from None
        if not isinstance(header, dict):
            raise MergeError(f"{where} corrupt header; re-save or re-download it")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[TensorMeta, int]] = {}
        data_end = 0
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(v) for v in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise MergeError(f"{where} tensor {name!r} has an invalid or unsupported header entry "
                                 f"{entry!r}; re-save the model") from None
            meta = TensorMeta(shape, dtype)
            if end - begin != meta.nbytes or begin < 0:
                raise MergeError(f"{where} tensor {name!r}: header offsets do not match its shape "
                                 f"{list(shape)} and dtype; the file is corrupt, re-save it")
            self._entries[name] = (meta, begin)
            data_end = max(data_end, end)
        if self._data_start + data_end > size:
            raise MergeError(f"{where} truncated: the header needs {self._data_start + data_end} bytes, "
                             f"the file has {size}; re-download or re-save it")

    def names(self) -> list[str]:
        return list(self._entries)

    def meta(self, name: str) -> TensorMeta:
        return self._entries[name][0]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or (when start/stop are given) its flat elements [start, stop)."""
        meta, begin = self._entries[name]
        whole = start == 0 and stop is None
        stop = meta.numel if stop is None else stop
        item = meta.dtype.itemsize
        nbytes = (stop - start) * item
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            offset = self._data_start + begin + start * item
            done = 0
            while done < nbytes:
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if got <= 0:
                    raise MergeError(f"{self.path}: unexpected end of file reading tensor {name!r}; "
                                     "re-download or re-save it")
                done += got
        flat = buf.view(meta.dtype) if meta.dtype != torch.bool else buf.bool()
        return flat.reshape(meta.shape) if whole else flat

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class SafetensorsStreamWriter:
    """Writes a safetensors file whose names, dtypes and shapes are known before any data."""

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, TensorMeta]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        self._offsets: dict[str, tuple[TensorMeta, int]] = {}
        pos = 0
        for name, meta in entries:
            if meta.dtype not in DTYPE_NAMES:
                raise MergeError(f"cannot write tensor {name!r} of dtype {meta.dtype} to safetensors; "
                                 "add it to `exclude` or convert the model")
            header[name] = {"dtype": DTYPE_NAMES[meta.dtype], "shape": list(meta.shape),
                            "data_offsets": [pos, pos + meta.nbytes]}
            self._offsets[name] = (meta, pos)
            pos += meta.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)
        self._data_start = 8 + len(raw)
        self._written: dict[str, dict[int, int]] = {name: {} for name in self._offsets}  # start -> count
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self._fd, self._data_start + pos)

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write `tensor` (already in the planned dtype) at flat element `start` of `name`."""
        meta, begin = self._offsets[name]
        if tensor.dtype != meta.dtype:
            raise AssertionError(f"{name}: writing {tensor.dtype}, planned {meta.dtype}")
        data = tensor.detach().contiguous().reshape(-1)
        if data.numel() == 0:
            return
        raw = memoryview(data.view(torch.uint8).numpy()) if data.dtype != torch.bool else \
            memoryview(data.to(torch.uint8).numpy())
        offset = self._data_start + begin + start * meta.dtype.itemsize
        done = 0
        while done < len(raw):
            done += os.pwrite(self._fd, raw[done:], offset + done)
        self._written[name][start] = data.numel()  # a rewrite of a block replaces its entry

    def close(self) -> None:
        if self._fd < 0:
            return
        missing = [n for n, (m, _) in self._offsets.items() if sum(self._written[n].values()) != m.numel]
        os.close(self._fd)
        self._fd = -1
        if missing:
            raise AssertionError(f"{self.path}: tensors not fully written: {missing[:5]}")


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
              metadata: dict[str, str] | None = None) -> None:
    """Write a dict of tensors (a small helper for masks, tests and bench fixtures)."""
    entries = [(n, TensorMeta(tuple(t.shape), t.dtype)) for n, t in tensors.items()]
    writer = SafetensorsStreamWriter(path, entries, metadata)
    for n, t in tensors.items():
        writer.write(n, t)
    writer.close()
