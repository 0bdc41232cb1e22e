"""The fused kernels as an extension module built at install time (setup.py): nothing compiled or
cached at run time, the eager kernels (with a note saying why) where it was not built, and kernel
threads owned by whoever runs a merge."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from modalmerge.api import merge_state_dicts
from modalmerge.ops import fused, threads

SRC = Path(__file__).resolve().parents[1] / "src"

# Runs in a fresh process: what a process that imports the kernels and calls one starts (a
# compiler would be a subprocess; the old loader was ctypes), and what the kernels say of themselves.
PROBE = """
import json, sys
import torch  # torch's own start-up (it loads libraries through ctypes) is not ours
started = []
sys.addaudithook(lambda event, args: started.append(event)
                 if event in ("subprocess.Popen", "os.system", "os.posix_spawn", "os.exec", "ctypes.dlopen") else None)
if sys.argv[1] == "absent":
    sys.modules["modalmerge.ops.ckernels"] = None  # as installed without a C compiler
from modalmerge.ops import fused, threads
base = torch.zeros(1 << 18, dtype=torch.bfloat16)
try:
    with threads.KernelThreads(2) as pool, threads.threads_in_use(pool):
        out = fused.weighted_delta_sum(base, [base + 1, base - 2], torch.ones(2))
    result = float(out.sum())
except fused.FusedUnavailable as e:
    result = str(e)
print(json.dumps({"started": started, "note": fused.note(), "usable": fused.usable(), "result": result}))
"""


def _probe(mode: str, tmp_path: Path) -> dict:
    home = tmp_path / "home"
    env = dict(os.environ, HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), MODALMERGE_CACHE=str(home / "mm"),
               PYTHONPATH=str(SRC), MODALMERGE_FUSED="1")
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not home.exists()  # no cache, no build written anywhere under HOME
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_kernels_run_with_no_compiler_and_no_cache(tmp_path):
    if fused.ckernels is None:
        pytest.skip(fused.note())
    got = _probe("installed", tmp_path)
    assert got["started"] == []  # no compiler process, no library loaded by hand
    assert got["usable"] and got["note"].startswith("fused C kernels (modalmerge.ops.ckernels, ")
    assert got["result"] == -(1 << 18)  # Σ (1 − 2) over the block


def test_without_the_extension_the_note_says_why(tmp_path):
    got = _probe("absent", tmp_path)
    assert got["started"] == []
    assert not got["usable"]
    why = "eager torch (the C extension modalmerge.ops.ckernels was not built: reinstall with a C compiler)"
    assert got["note"] == why and got["result"] == why  # the kernels raise FusedUnavailable with it


def _kernel_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("modalmerge-kernel")]


@pytest.mark.skipif(fused.ckernels is None, reason="the C extension was not built")
def test_kernel_threads_are_used_in_their_context_and_closed():
    assert not _kernel_threads()
    n = 4 * fused.PARALLEL_MIN
    base = torch.zeros(n)
    models = [torch.ones(n), torch.full((n,), 2.0)]
    serial = fused.weighted_delta_sum(base, models, torch.ones(2))  # no pool in use: the calling thread
    assert not _kernel_threads()
    with threads.KernelThreads(2) as pool:
        with threads.threads_in_use(pool):
            split = fused.weighted_delta_sum(base, models, torch.ones(2))
        assert len(_kernel_threads()) == 1  # the calling thread and one helper
    assert not _kernel_threads()  # closed with the pool
    assert torch.equal(split, serial)


def test_a_merge_leaves_no_kernel_threads(monkeypatch):
    monkeypatch.setattr(fused, "PARALLEL_MIN", 1 << 10)  # split even this small block
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        base = {"w": torch.randn(256, 64, generator=g)}
        models = [{"w": base["w"] + 0.1 * torch.randn(256, 64, generator=g)} for _ in range(2)]
        merge_state_dicts("ties", models, base=base, params={"density": 0.5})
    finally:
        torch.set_num_threads(before)
    assert not _kernel_threads()
