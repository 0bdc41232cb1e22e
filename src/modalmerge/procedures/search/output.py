"""The output folder of a search: OUT/search/ (journal, trials, plot) while it runs, then the best
trial's merge around it, put in place at once.

While trials run, OUT holds only search/, whose journal lets an interrupted search resume (the
same command, the same OUT). At the end the best merge is written as any merge is
(procedures/run.run_merge, atomically) into a staging folder beside OUT, search/ is moved into
it, and it takes OUT's place by renames. A search killed between those renames leaves the staging
folder complete, with the journal inside; the next run with the same OUT finishes the renames
first (`recover`). OUT is never an input, inside one, or around one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the journal's own file lock still serialises writes
    fcntl = None

from ...checkpoint.output import refuse_output_over_inputs, remove_tree
from ...errors import MergeError

SEARCH_DIR, JOURNAL, LOCK = "search", "journal.log", "search.lock"


@dataclass
class SearchFolder:
    """OUT, its search/ folder, and the lock this process holds on it."""

    out: Path
    search: Path
    lock_fd: int | None

    @property
    def journal(self) -> Path:
        return self.search / JOURNAL

    def release(self) -> None:
        fd, self.lock_fd = self.lock_fd, None
        if fd is not None:
            os.close(fd)


def staging(out: Path) -> Path:
    return out.parent / f".{out.name}.search-final"


def retired(out: Path) -> Path:
    return out.parent / f".{out.name}.search-old"


def recover(out: Path) -> None:
    """Finish the renames of a search killed while putting its merge in place."""
    stage, old = staging(out), retired(out)
    if os.path.lexists(stage) and not (stage / SEARCH_DIR / JOURNAL).exists():
        remove_tree(stage)  # a merge placed but not joined by search/: made again at the end
    if (stage / SEARCH_DIR / JOURNAL).exists():
        if os.path.lexists(out):
            if os.path.lexists(old):
                remove_tree(old)
            os.rename(out, old)
        os.rename(stage, out)
    if os.path.lexists(old):
        remove_tree(old)


def prepare(out: str | os.PathLike, inputs: Iterable[tuple[str, str]], overwrite: bool = False) -> SearchFolder:
    """OUT/search/ made (or found, to resume) and locked against a second search into OUT."""
    out = Path(os.path.abspath(out))
    if not out.name:
        raise MergeError(f"output {out} is a file system root; choose an output folder")
    refuse_output_over_inputs(out, list(inputs))
    recover(out)
    search = out / SEARCH_DIR
    if os.path.lexists(out):
        if not out.is_dir():
            raise MergeError(f"output {out} exists and is not a folder; choose another -o")
        resumable = (search / JOURNAL).exists()
        if not resumable and any(out.iterdir()) and not overwrite:
            raise MergeError(f"output {out} already exists and holds no search to resume; choose another -o or pass "
                             "--overwrite (it is replaced when the search ends)")
    try:
        search.mkdir(parents=True, exist_ok=True)
        fd = os.open(search / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise MergeError(f"output {out}: cannot write there ({e.strerror.lower() if e.strerror else e}); choose "
                         "another -o") from None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MergeError(f"output {out}: another search is running into it (it holds {search / LOCK}); wait for "
                             "it or choose another -o") from None
    folder = SearchFolder(out, search, fd)
    if overwrite and (search / JOURNAL).exists():
        (search / JOURNAL).unlink()  # --overwrite starts the search over
    return folder


def place(folder: SearchFolder, write_merge) -> Path:
    """Write the best merge (`write_merge(path)`: an atomic merge into a new folder) and put it at
    OUT with search/ inside it."""
    out, stage, old = folder.out, staging(folder.out), retired(folder.out)
    if os.path.lexists(stage):
        remove_tree(stage)
    write_merge(stage)
    os.rename(folder.search, stage / SEARCH_DIR)  # the journal goes with the merge from here on
    folder.search = stage / SEARCH_DIR
    if os.path.lexists(old):
        remove_tree(old)
    os.rename(out, old)
    os.rename(stage, out)
    folder.search = out / SEARCH_DIR
    remove_tree(old)
    return out
