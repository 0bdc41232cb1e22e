"""Output folders: never over an input, placed atomically and exclusively.

Inputs are read-only. `refuse_output_over_inputs` compares the output with every input a
command reads (models, base, adapters and their base, calibration and optimizer-state files,
`copy_files_from`, a previous continual merge, an align reference, an extract source), after
resolving symlinks (os.path.realpath): an output that is an input, lies inside one or contains
one is refused before any work, with or without --overwrite. `AtomicFolder` runs the same check.

How an output is written (`AtomicFolder`):

- Everything goes into a hidden partial folder beside the destination, `.NAME.partial-PID`,
  which becomes NAME only when the whole merge has succeeded; a failed or interrupted merge
  (an exception, Ctrl-C, and SIGTERM/SIGHUP, which the CLI turns into KeyboardInterrupt)
  removes it and never touches NAME. Temporary data of the merge lives inside it too, so the
  one removal covers both. Removal finishes even if a second interrupt arrives meanwhile, and
  a partial folder still open when the interpreter exits (an interrupt that landed between
  its creation and the caller's `try`) is removed by an atexit hook.
- A lock, `fcntl.flock` on `.NAME.modalmerge.lock` in the same parent folder, held from the
  start to the end, makes a second modalmerge writing the same path fail at once, instead of
  both running and the later one silently replacing the earlier result. The lock file is
  removed when the holder is done (each locker checks, once it holds the lock, that the file
  it locked is still the one at that path, so removing it is safe).
- The partial folder is put in place with a rename that cannot replace anything:
  `renameat2(RENAME_NOREPLACE)` on Linux (called through ctypes). The check that nothing is
  at NAME is made at the start, but a folder that appears at NAME during a long merge (another
  program, a user) must not be deleted by the final rename; with NOREPLACE the kernel checks
  and renames in one step, and the merge fails with one line, leaving what appeared alone.
- --overwrite replaces only what was checked at the start (its st_dev/st_ino are kept), and
  only once the new output is complete: `renameat2(RENAME_EXCHANGE)` swaps the two folders in
  one step, the identity of the swapped-out folder is checked again (the swap is undone if it
  is not what was checked), and only then is the old output deleted. The path never lacks a
  complete output. If something else is at NAME by then, the merge fails with one line.
- The next run that writes into the same parent folder sweeps `.NAME.partial-PID` folders
  whose process is gone (os.kill(pid, 0)) and whose lock is free: what a kill -9 leaves. Only
  that naming pattern is touched, never a symlink.

The fallback, where renameat2 is missing (not Linux, old libc) or the file system refuses its
flags: with the lock held, check that NAME is absent, then os.rename. os.rename never replaces
a file by a folder nor a non-empty folder (and never replaces anything on Windows), so the
only thing it could replace is an empty folder made by another program in the instant between
the check and the rename. --overwrite then renames the old output aside to `.NAME.old-PID`
(no-replace), the new one in (no-replace), and deletes the old one; a kill -9 in the instant
between the two renames leaves the old output in `.NAME.old-PID`, which is never swept. Where
fcntl is missing (Windows) or the file system has no locks, there is no lock: placement is
still no-replace.

OSErrors of writing the output (full disk, read-only file system, no permission) become one
MergeError line naming the output and the fix (`output_error`).
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Collection, Iterable

import torch

from ..errors import MergeError
from .safetensors_io import SafetensorsStreamWriter, TensorMeta, check_regular

try:
    import fcntl
except ImportError:  # Windows: no lock (see the module docstring)
    fcntl = None

# Files that make a folder loadable by transformers, besides the weights.
# the tokenizer's files (left out by `merge --no-copy-tokenizer`, as mergekit's option does)
TOKENIZER_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "added_tokens.json", "spiece.model",
    "sentencepiece*.model", "*.tiktoken", "chat_template*",
)
AUX_PATTERNS = (
    "config.json", "generation_config.json", *TOKENIZER_PATTERNS,
    "preprocessor_config.json", "processor_config.json", "image_processor*.json",
    "video_preprocessor*.json", "feature_extractor*.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "1_Pooling", "2_Normalize",
)

DEFAULT_SHARD_BYTES = 5 * 1024**3

# -- inputs are read-only ------------------------------------------------------------------------

Inputs = Iterable["str | os.PathLike | tuple[str, str | os.PathLike | None] | None"]


def _inside(path: str, folder: str) -> bool:
    """Whether resolved `path` lies strictly inside resolved `folder`."""
    return path != folder and os.path.commonpath([path, folder]) == folder


def refuse_output_over_inputs(output: str | os.PathLike, inputs: Inputs) -> None:
    """Raise a MergeError if `output` is an input, lies inside one or contains one.

    `inputs`: paths, or (label, path) pairs such as ("model 'a'", "/models/a"); None and paths
    that do not exist (nothing there to protect) are skipped. Symlinks are resolved first.
    """
    out = os.path.realpath(output)
    for item in inputs:
        label, path = item if isinstance(item, tuple) else ("input", item)
        if path is None or str(path).startswith("<memory:") or not os.path.lexists(path):
            continue
        real = os.path.realpath(path)
        if out == real or (os.path.exists(out) and os.path.exists(real) and os.path.samefile(out, real)):
            how = "is"
        elif _inside(out, real):
            how = "lies inside"
        elif _inside(real, out):
            how = "contains"
        else:
            continue
        resolved = f" (resolved: {out})" if out != os.path.abspath(output) else ""
        raise MergeError(f"output {output}{resolved} {how} the {label} ({os.path.abspath(path)}); inputs are never "
                         "written, replaced or deleted, not even with --overwrite: choose an output folder outside "
                         "every input")


# -- errors of writing ---------------------------------------------------------------------------

_WRITE_ERRORS = {
    errno.ENOSPC: "free space there or choose an output on another disk",
    errno.EDQUOT: "free space within your quota or choose an output on another disk",
    errno.EROFS: "choose an output folder on a writable file system",
    errno.EFBIG: "a file is too large for that file system: lower max_shard_bytes or write elsewhere",
    errno.EACCES: "permission denied: choose an output folder you can write to",
    errno.EPERM: "not permitted: choose an output folder you can write to",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter output name",
}


def output_error(e: OSError, final: str | os.PathLike) -> MergeError:
    """One line for an OSError met while writing the output `final`."""
    fix = _WRITE_ERRORS.get(e.errno, "check that folder, or choose another output folder")
    return MergeError(f"cannot write the output {final}: {e.strerror or e}; {fix}")


# -- no-replace renames --------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_renameat2_fn = None


class _Unsupported(Exception):
    """renameat2 (or this flag) is not available here: use the fallback."""


def _renameat2(src, dst, flags: int) -> None:
    global _renameat2_fn
    if _renameat2_fn is None:
        fn = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.4
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = False
        _renameat2_fn = fn
    if _renameat2_fn is False:
        raise _Unsupported
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without it
            raise _Unsupported
        raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src, dst) -> None:
    """Rename `src` to `dst`; FileExistsError if anything is at `dst`, which is never replaced."""
    try:
        return _renameat2(src, dst, _RENAME_NOREPLACE)
    except _Unsupported:
        pass
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)  # never replaces a file by a folder, nor a non-empty folder
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR) or isinstance(e, FileExistsError):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


def _exchange(a, b) -> bool:
    """Swap two paths in one step; False where the system cannot."""
    try:
        _renameat2(a, b, _RENAME_EXCHANGE)
        return True
    except _Unsupported:
        return False


def _identity(path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def remove_tree(path) -> None:
    """shutil.rmtree that finishes even if an interrupt arrives meanwhile (a second Ctrl-C or
    SIGTERM); the interrupt is raised again once the folder is gone."""
    pending = None
    while True:
        try:
            if os.path.islink(path) or os.path.isfile(path):
                os.unlink(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
            break
        except FileNotFoundError:
            break
        except KeyboardInterrupt as e:
            pending = e
        except OSError:
            break
    if pending is not None:
        raise pending


# -- the lock and the sweep ----------------------------------------------------------------------

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")


def lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.modalmerge.lock"


class _Lock:
    """An exclusive, non-blocking flock on a lock file; the file is removed on release."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when held (or when locks are not available here), False when another holds it."""
        if fcntl is None:
            return True
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return True  # a file system without locks: no-replace placement still holds
                raise
            # its previous holder may have removed the file between our open and our lock
            if _identity(self.path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                self.fd = fd
                return True
            os.close(fd)
        return False

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: no one else can be holding this file
        except OSError:
            pass
        os.close(fd)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process there: never sweep
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: alive, someone else's; a pid too large: not ours to judge
        return True
    return True


def sweep_partials(parent: Path, held: dict[str, "_Lock"] | None = None) -> list[Path]:
    """Remove `.NAME.partial-PID` folders in `parent` whose process is gone and whose lock is
    free (what a kill -9 leaves); `held`: names whose lock this process holds. Returns them."""
    held = held or {}
    swept = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return swept
    for entry in entries:
        m = _PARTIAL.match(entry.name)
        if not m or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        name = m["name"]
        lock = None
        if name not in held:
            lock = _Lock(parent / f".{name}.modalmerge.lock")
            try:
                if not lock.acquire():
                    continue  # a live merge into NAME (a pid of another namespace, or reused)
            except OSError:
                continue
        try:
            remove_tree(entry.path)
            swept.append(Path(entry.path))
        finally:
            if lock is not None:
                lock.release()
    return swept


# -- the output folder ---------------------------------------------------------------------------

# Partial folders of this process not yet committed or aborted. An interrupt can land between the
# creation of an output and the `try` that would abort it (in a caller, between two statements);
# at exit, whatever is still here is removed, so a SIGTERM never leaves a partial folder.
_OPEN: set["AtomicFolder"] = set()


@atexit.register
def _abort_open() -> None:
    for folder in list(_OPEN):
        try:
            folder.abort()
        except BaseException:
            pass


class AtomicFolder:
    """A partial folder (`tmp`) that becomes `final` on commit() and disappears on abort().

    `inputs` (paths or (label, path) pairs) are refused as, around or inside `final`. The lock
    is held from here to commit() or abort(); see the module docstring."""

    def __init__(self, final: str | os.PathLike, overwrite: bool = False, inputs: Inputs = ()):
        self.final = Path(os.path.abspath(final))
        self.tmp = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"
        self._lock: _Lock | None = None
        self._old: tuple[int, int] | None = None  # identity of what --overwrite replaces
        self._made = False  # whether tmp is ours (another AtomicFolder of this process may hold the name)
        if not self.final.name:
            raise MergeError(f"output {final} is a file system root; choose an output folder")
        refuse_output_over_inputs(self.final, inputs)
        try:
            try:
                self.final.parent.mkdir(parents=True, exist_ok=True)
                lock = _Lock(lock_path(self.final))
                if not lock.acquire():
                    raise MergeError(f"output {self.final} is being written by another modalmerge (it holds "
                                     f"{lock.path}); wait for it to finish or choose another output folder")
                self._lock = lock
                sweep_partials(self.final.parent, {self.final.name: lock})
                if os.path.lexists(self.final):
                    if not overwrite:
                        raise MergeError(f"output {self.final} already exists; choose another --output or pass "
                                         "--overwrite")
                    if not self.final.is_dir():
                        raise MergeError(f"output {self.final} exists and is not a folder; choose another --output")
                    self._old = _identity(self.final)
                if os.path.lexists(self.tmp):  # left by a dead process that had our pid
                    remove_tree(self.tmp)
                self._made = True  # before mkdir: an interrupt right after it must still remove it
                _OPEN.add(self)
                self.tmp.mkdir()
            except OSError as e:  # nothing is read here: every error is the output's
                raise output_error(e, self.final) from None
        except BaseException:
            self.abort()
            raise

    @contextmanager
    def writing(self):
        """OSErrors of writing the output (full disk, read-only, no permission) as one line."""
        try:
            yield
        except OSError as e:
            if is_output_error(e, self.final):
                raise output_error(e, self.final) from None
            raise

    def scratch(self, prefix: str) -> Path:
        """A fresh folder for temporary data inside the partial folder (removed with it by
        abort(); the caller removes it before commit())."""
        import tempfile

        with self.writing():
            return Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp))

    def commit(self) -> Path:
        """Put the partial folder in place: only where nothing is, or (--overwrite) over exactly
        what was checked at the start. Raises a MergeError, leaving what is there, otherwise."""
        try:
            try:
                if self._old is None or _identity(self.final) is None:
                    self._place_new()
                else:
                    self._replace_old()
            except OSError as e:
                raise output_error(e, self.final) from None
            return self.final
        except BaseException:
            self.abort()  # our result, or (after the swap) the old output being deleted
            raise
        finally:
            self._release()

    def _appeared(self) -> MergeError:
        return MergeError(f"output {self.final} appeared while merging (made by something else); it was left as it "
                          "is and this merge's result discarded: merge again into another folder, or with "
                          "--overwrite to replace it")

    def _place_new(self) -> None:
        try:
            rename_noreplace(self.tmp, self.final)
        except FileExistsError:
            raise self._appeared() from None

    def _replace_old(self) -> None:
        changed = MergeError(f"output {self.final} was replaced by something else while merging; it was left as it "
                             "is and this merge's result discarded: merge again (with --overwrite to replace it)")
        if _identity(self.final) != self._old:
            raise changed
        if _exchange(self.tmp, self.final):
            if _identity(self.tmp) != self._old:  # it changed in the instant since the check: undo
                _exchange(self.tmp, self.final)
                raise changed
            remove_tree(self.tmp)  # the old output: the new one is in place
            return
        old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"  # the fallback
        rename_noreplace(self.final, old)
        if _identity(old) != self._old:
            rename_noreplace(old, self.final)
            raise changed
        try:
            rename_noreplace(self.tmp, self.final)
        except FileExistsError:
            raise MergeError(f"output {self.final} appeared while replacing it; the old output is in {old}, and "
                             "this merge's result discarded: move things back and merge again") from None
        remove_tree(old)

    def abort(self) -> None:
        try:
            if self._made:
                remove_tree(self.tmp)
        finally:
            self._release()

    def _release(self) -> None:
        _OPEN.discard(self)
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()


def is_output_error(e: OSError, final: Path) -> bool:
    """Whether an OSError met while writing `final` is the output's: a full or read-only disk, or
    an error on a path of the output or its partial folder (an input that cannot be read is not)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return True
    ours = (str(final), str(final.parent / f".{final.name}.partial-{os.getpid()}"))
    for name in (e.filename, e.filename2):
        if name is not None:
            p = os.path.abspath(os.fsdecode(name))
            if any(p == o or _inside(p, o) for o in ours):
                return True
    return False


def shard_layout(entries: list[tuple[str, TensorMeta]], stem: str = "model",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[tuple[str, list[tuple[str, TensorMeta]]]]:
    """The shard files of `entries`, in order: (file name, its tensors), each filled up to
    max_shard_bytes (a tensor larger than that has a shard of its own)."""
    shards: list[list[tuple[str, TensorMeta]]] = [[]]
    size = 0
    for name, meta in entries:
        if shards[-1] and size + meta.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, meta))
        size += meta.nbytes
    n = len(shards)
    return [(f"{stem}.safetensors" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors", shard)
            for i, shard in enumerate(shards)]


class ShardedWriter:
    """Streams planned tensors into one or more safetensors shards, with an index when sharded.

    `files`: the shard files this writer opens (default: all of them); the others are written
    into the same folder by other processes (a merge spread over Ray: procedures/ray_merge.py)."""

    def __init__(self, folder: Path, entries: list[tuple[str, TensorMeta]], stem: str = "model",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None,
                 files: Collection[str] | None = None):
        layout = shard_layout(entries, stem, max_shard_bytes)
        n = len(layout)
        self._writers: dict[str, SafetensorsStreamWriter] = {}
        self._files: list[SafetensorsStreamWriter] = []
        weight_map = {}
        for fname, shard in layout:
            for name, _ in shard:
                weight_map[name] = fname
            if files is not None and fname not in files:
                continue
            writer = SafetensorsStreamWriter(folder / fname, shard, metadata)
            self._files.append(writer)
            for name, _ in shard:
                self._writers[name] = writer
        if n > 1:
            total = sum(m.nbytes for _, m in entries)
            (folder / f"{stem}.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        self._writers[name].write(name, tensor, start)

    def close(self) -> None:
        for w in self._files:
            w.close()


def _copy_regular(src, dst) -> None:
    """shutil.copy2 of a regular file only: a FIFO or device in a model folder would block the copy."""
    check_regular(src, "config, tokenizer or processor file")
    shutil.copy2(src, dst)


def copy_aux_files(src: Path | None, dst: Path, tokenizer: bool = True) -> list[str]:
    """Copy config, tokenizer and processor files from the chosen model's folder (the tokenizer's
    files only with `tokenizer`)."""
    if src is None or not src.is_dir():
        return []
    copied = []
    for pattern in AUX_PATTERNS if tokenizer else [p for p in AUX_PATTERNS if p not in TOKENIZER_PATTERNS]:
        for f in sorted(src.glob(pattern)):
            target = dst / f.name
            if target.exists():
                continue
            if f.is_dir():
                shutil.copytree(f, target, copy_function=_copy_regular)
            else:
                _copy_regular(f, target)
            copied.append(f.name)
    return copied


# config keys that hold a decoder's block count (the first one present is set), and layer-indexed lists cut with it
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
LAYER_LISTS = ("layer_types",)


def set_layer_count(config: Path, layer_sources: list[int], key: str = "") -> None:
    """A stacked model's config.json (engine/slices.py): the block count is len(layer_sources), and
    a layer-indexed list (`layer_types`) keeps, for each output block, the entry of the block it
    comes from (the last entry for a block past the list). `key`: where the count is, dotted into a
    sub-config (`text_config.num_hidden_layers`, one module's: engine/modules.py); by default the
    first of LAYER_COUNT_KEYS at the top. A missing or unreadable config is left as it is (there is
    nothing to fix)."""
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text())
    except ValueError:
        return
    if not isinstance(data, dict):
        return
    *inside, last = key.split(".") if key else [""]
    holder = data
    for part in inside:  # a sub-config the file lacks: nothing to fix there
        holder = holder.get(part) if isinstance(holder, dict) else None
    if not isinstance(holder, dict):
        return
    count_key = last or next((k for k in LAYER_COUNT_KEYS if isinstance(holder.get(k), int)), None)
    if count_key is not None:
        holder[count_key] = len(layer_sources)
    for list_key in LAYER_LISTS:
        values = holder.get(list_key)
        if isinstance(values, list) and values:
            holder[list_key] = [values[min(i, len(values) - 1)] for i in layer_sources]
    config.write_text(json.dumps(data, indent=2))
