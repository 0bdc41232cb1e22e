"""The safetensors format, read and written without holding a model in memory.

Reading opens regular files only, validates the header at least as strictly as the safetensors
library (which then parses it too, as a second opinion), and fetches each tensor (or any flat
element range of it) with positioned reads into a fresh buffer: only the bytes asked for ever
enter the process, and the page cache does not count against the merge's resident memory the
way a long-lived map of several multi-GB files would. Writing lays out the header first, from
the planned names, dtypes and shapes, and then writes each tensor's bytes at its offset as it is
produced, so an output shard is never assembled in memory.
"""

from __future__ import annotations

import json
import math
import os
import stat
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
# Every dtype the safetensors format defines (safetensors' Rust `Dtype`), with its size in bits:
# a file using one that torch cannot hold here is valid, but refused as unsupported.
_FORMAT_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
                "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
                "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}

_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_U64 = 2 ** 64

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str | os.PathLike, what: str = "file") -> None:
    """Refuse anything but a regular file (symlinks followed): reading a FIFO, device or socket
    blocks or never ends, and a folder cannot be read as a file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise MergeError(f"{path}: cannot open ({e.strerror}); check the path") from None
    if not stat.S_ISREG(st.st_mode):
        raise MergeError(f"{path} is {_kind(st.st_mode)}, not a regular file; give the path of a {what}")


def open_regular(path: str | os.PathLike, what: str = "file") -> int:
    """A read-only descriptor of `path`, which must be a regular file. The open does not block
    (O_NONBLOCK) and the descriptor is checked again, so a FIFO swapped in after the first check
    cannot hang the process either."""
    check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MergeError(f"{path}: cannot open ({e.strerror}); check the path") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise MergeError(f"{path} is {_kind(mode)}, not a regular file; give the path of a {what}")
    return fd


def read_regular(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The whole content of a small regular file (a config, an index), at most `limit` bytes."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise MergeError(f"{path}: {size} bytes, more than the {limit} a {what} may have; check the path")
        chunks, got = [], 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:
            raise MergeError(f"{path}: more than the {limit} bytes a {what} may have; check the path")
        return b"".join(chunks)
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror}); check the file") from None
    finally:
        os.close(fd)


class _Object(dict):
    """A JSON object that remembers the first key it saw twice (json.loads keeps the last silently)."""

    duplicate: str | None = None


def _object(pairs: list) -> _Object:
    out = _Object()
    for k, v in pairs:
        if k in out and out.duplicate is None:
            out.duplicate = k
        out[k] = v
    return out


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: safetensors' parser says "number out of range"
        raise ValueError(f"{text} is out of range")
    return value


def _int(text: str):
    # safetensors' JSON parser reads `-0` as a float (never a usize), and over-long integers too
    return _float(text) if text == "-0" or len(text) > 40 else int(text)


def _not_json(text: str):
    raise ValueError(f"{text} is not JSON")


def _is_usize(v) -> bool:
    return type(v) is int and 0 <= v < _U64


def _r(v) -> str:
    """repr, cut short: a message stays one readable line whatever a corrupt header holds."""
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_header(raw: bytes, where: str) -> tuple[dict[str, str], list[tuple[str, "TensorMeta", int, int]]]:
    """Validate a safetensors header as the safetensors library does (and refuse duplicated
    names, which it may keep silently); return its metadata and (name, meta, begin, end) in
    header order. `where` starts every message."""
    corrupt = f"{where} corrupt header"
    fix = "re-save or re-download it"
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_object, parse_int=_int, parse_float=_float,
                            parse_constant=_not_json)
        # a lone surrogate escape ("\ud800") is not a character; safetensors refuses it anywhere
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError, RecursionError):
        raise MergeError(f"{corrupt} (not JSON); {fix}") from None
    if not isinstance(header, _Object):
        raise MergeError(f"{corrupt} (not a JSON object); {fix}")
    if header.duplicate is not None:
        raise MergeError(f"{corrupt}: the name {_r(header.duplicate)} appears twice; {fix}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:  # absent or null, as the library allows
        metadata = _Object()
    if not isinstance(metadata, _Object) or metadata.duplicate is not None or not all(
            isinstance(v, str) for v in metadata.values()):
        raise MergeError(f"{corrupt}: __metadata__ must map unique strings to strings; {fix}")
    entries = []
    for name, entry in header.items():
        bad = f"{where} tensor {_r(name)}:"
        if not isinstance(entry, _Object) or entry.duplicate is not None:
            raise MergeError(f"{bad} corrupt header entry (not an object with unique fields); {fix}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _FORMAT_BITS:
            raise MergeError(f"{bad} unknown dtype {_r(dtype)} in the header; {fix}")
        if not isinstance(shape, list) or not all(_is_usize(s) for s in shape):
            raise MergeError(f"{bad} shape {_r(shape)} is not a list of non-negative integers; {fix}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_usize(v) for v in offsets):
            raise MergeError(f"{bad} data_offsets {_r(offsets)} is not a [begin, end] pair of non-negative "
                             f"integers; {fix}")
        numel = 1
        for s in shape:  # every partial product must fit in 64 bits, as in the library
            numel *= s
            if numel >= _U64:
                break
        nbits = numel * _FORMAT_BITS[dtype]
        if nbits >= _U64:
            raise MergeError(f"{bad} shape {_r(shape)} is too large; {fix}")
        begin, end = offsets
        if end < begin or nbits % 8 or end - begin != nbits // 8:
            raise MergeError(f"{bad} its data_offsets {offsets} ({end - begin} bytes) do not match its shape "
                             f"{_r(shape)} and dtype {dtype} ({nbits / 8:g} bytes); the file is corrupt, {fix}")
        if dtype not in DTYPES:
            raise MergeError(f"{bad} dtype {dtype} is not supported by modalmerge; convert the model to a "
                             "supported dtype (F32, F16, BF16, ...)")
        entries.append((name, TensorMeta(tuple(shape), DTYPES[dtype]), begin, end))
    # Tensors must tile the data area exactly, in offset order from 0: no overlap, no gap.
    pos = 0
    for name, _, begin, end in sorted(entries, key=lambda e: (e[2], e[3])):
        if begin != pos:
            how = "overlap the tensor before it" if begin < pos else f"leave a {begin - pos}-byte gap before it"
            raise MergeError(f"{where} tensor {_r(name)}: its data_offsets [{begin}, {end}] {how} (tensors must "
                             f"fill the data area in order); the file is corrupt, {fix}")
        pos = end
    return dict(metadata), entries


def _library_check(fd: int, path: Path, where: str) -> None:
    """Have the safetensors library parse the file as well, through the same descriptor (so it is
    the same file): whatever it refuses is refused, even if the checks above missed it. It reads
    only the header and maps the file, without touching the data."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        return
    same = next((f"{d}/{fd}" for d in ("/proc/self/fd", "/dev/fd") if os.path.isdir(d)), str(path))
    try:
        with safe_open(same, framework="numpy"):
            pass
    except SafetensorError as e:
        raise MergeError(f"{where} the safetensors library refuses it ({_r(str(e))}); the file is corrupt, "
                         "re-save or re-download it") from None
    except OSError:
        pass  # it could not map the file (a filesystem without mmap); the checks above stand


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
        self._fd = -1
        self._fd = open_regular(self.path, "safetensors file")
        try:
            self._validate()
        except BaseException:
            self.close()
            raise

    def _validate(self) -> None:
        where = f"{self.path}:"
        try:
            size = os.fstat(self._fd).st_size
            if size < 8:
                raise MergeError(f"{where} not a safetensors file ({size} bytes); re-save or re-download it")
            (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if header_len > min(size - 8, _MAX_HEADER):
                raise MergeError(f"{where} corrupt or truncated header (says {header_len} bytes, file has {size}); "
                                 "re-save or re-download it")
            raw = os.pread(self._fd, header_len, 8)
            if len(raw) != header_len:
                raise MergeError(f"{where} truncated header; re-download or re-save it")
        except OSError as e:
            raise MergeError(f"{where} cannot read ({e.strerror}); check the file") from None
        self.metadata, entries = parse_header(raw, where)
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[TensorMeta, int]] = {n: (meta, begin) for n, meta, begin, _ in entries}
        data_end = self._data_start + max((end for *_, end in entries), default=0)
        if data_end > size:
            raise MergeError(f"{where} truncated: the header needs {data_end} bytes, the file has {size}; "
                             "re-download or re-save it")
        if data_end < size:
            raise MergeError(f"{where} {size - data_end} bytes after the last tensor that the header does not "
                             "account for; the file is corrupt, re-save or re-download it")
        _library_check(self._fd, self.path, where)

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
