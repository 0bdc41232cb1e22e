"""`modalmerge search` on Ray (issue 14, items 3 and 6): a local Ray instance with two workers, a
worker killed in the middle of a trial (that trial failed, a new worker, the search goes on), a
real two-node cluster (`ray start --head` plus `ray start --address`), an address where no
cluster answers (one line), and `modalmerge bench search --quick`.

Ray's gRPC servers listen on every interface, even with the node address 127.0.0.1, so every
test that starts Ray runs it in a subprocess inside new network and PID namespaces
(`unshare --net --pid`, then `ip link set lo up`): the only interface is loopback, every Ray
address is 127.0.0.1, and when the script ends the kernel ends every process it started. Those
tests need root and unshare, and skip with the reason otherwise. Ray's token is a fresh one in
the environment (nothing written to ~/.ray) and its files go to a private temporary folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

import modalmerge  # where the subprocesses find the package
from conftest import cli_fails, perturbed, tiny_llama
from test_search import save_tokenizer  # its word-level tokenizer: w0 ... w99
from modalmerge.errors import MergeError
from modalmerge.procedures.ray_cluster import check_reachable
from modalmerge.procedures.search.ray_runner import RayRunner

pytest.importorskip("ray")
pytest.importorskip("optuna")
pytest.importorskip("transformers")

SCRIPT_TIMEOUT_S = 300

# a --eval python: callable that kills its worker process on the first call of the whole search
KILLER = '''
import os


def score(model, tokenizer):
    try:   # O_EXCL: of two workers calling at once, exactly one creates the mark and dies
        os.close(os.open(os.environ["MODALMERGE_TEST_KILL_MARK"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return {"score": float(sum(float(p.float().sum()) for p in model.parameters()))}
    os._exit(3)
'''


def loopback_namespace_problem() -> str | None:
    """Why Ray cannot be started here inside a loopback-only namespace, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to make a network namespace (unshare -n) that has only loopback"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux / iproute2) for a loopback-only network namespace"
    probe = subprocess.run(["unshare", "--net", "--pid", "--kill-child", "--mount-proc", "ip", "link", "set", "lo",
                            "up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a loopback-only namespace here: {probe.stderr.strip() or probe.returncode}"
    return None


PROBLEM = loopback_namespace_problem()
needs_namespace = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")


def in_loopback_namespace(script: str, tmp: Path, extra_env: dict[str, str] | None = None):
    """Run a bash script in new network and PID namespaces whose only interface is loopback (up).
    When the script ends, or unshare is killed at the time-out, every process of it ends too."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="mmray-", dir="/tmp"))  # short: Ray's socket paths have a limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    src = str(Path(modalmerge.__file__).resolve().parents[1])
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_TMPDIR": str(ray_tmp),
                "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(tmp), src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    env.update(extra_env or {})
    try:
        return subprocess.run(["unshare", "--net", "--pid", "--kill-child", "--mount-proc", "bash", "-c",
                               f"set -e\nip link set lo up\ncd {shlex.quote(str(tmp))}\n{script}"],
                              env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def search_inputs(tmp_path_factory) -> Path:
    """A tiny Llama base and two fine-tunes with tokenizers, a validation text, a recipe searching
    λ, and the killer evaluator module."""
    root = tmp_path_factory.mktemp("search-ray")
    base = tiny_llama()
    for name, model in (("base", base), ("ft0", perturbed(base, 1, 0.05)), ("ft1", perturbed(base, 2, 0.05))):
        model.save_pretrained(root / name)
        save_tokenizer(root / name)
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (8,), generator=g)) for _ in range(8)]
    (root / "valid.txt").write_text("\n".join(lines) + "\n")
    (root / "recipe.yaml").write_text(yaml.safe_dump({
        "method": "task_arithmetic", "base": str(root / "base"),
        "models": [{"path": str(root / "ft0")}, {"path": str(root / "ft1")}],
        "params": {"lambda": {"search": {"uniform": [0.2, 1.2]}}}}, sort_keys=False))
    (root / "search_killer.py").write_text(KILLER)
    return root


def trials_of(out: Path) -> list[dict]:
    return json.loads((out / "search" / "trials.json").read_text())["trials"]


def search_command(out: str, *flags: str) -> str:
    return " ".join([shlex.quote(sys.executable), "-m", "modalmerge", "search", "recipe.yaml",
                     "--eval", "perplexity:valid.txt", "-o", out, "--no-progress", "--no-prune", *flags])


@pytest.fixture(scope="module")
def local_run(search_inputs) -> tuple[subprocess.CompletedProcess, Path]:
    """One search on a local Ray instance (ray.init) with two workers; the first call of the python
    evaluator kills its worker."""
    mark = search_inputs / "killed.mark"
    run = in_loopback_namespace(search_command("out-local", "--workers", "2", "--trials", "5", "--trust-recipe-code",
                                               "--eval", "python:search_killer:score"),
                                search_inputs, {"MODALMERGE_TEST_KILL_MARK": str(mark)})
    return run, search_inputs / "out-local"


@needs_namespace
def test_local_ray_instance_runs_trials_on_two_workers(local_run):
    run, out = local_run
    assert run.returncode == 0, run.stdout + run.stderr
    trials = trials_of(out)
    assert len(trials) == 5
    assert len({t["worker"] for t in trials}) >= 2          # both workers ran a trial (one of them died)
    assert len({t["node"] for t in trials}) == 1            # one local node, recorded
    assert all(t["worker"].startswith("actor ") and "127.0.0.1" in t["node"] for t in trials)
    assert (out / "model.safetensors").exists() or list(out.glob("*.safetensors"))


@needs_namespace
def test_a_killed_worker_fails_its_trial_and_the_search_goes_on(local_run):
    run, out = local_run
    assert run.returncode == 0, run.stdout + run.stderr
    trials = trials_of(out)
    failed = [t for t in trials if t["status"] == "failed"]
    assert len(failed) == 1 and "worker died" in failed[0]["error"], failed
    assert [t["status"] for t in trials].count("ok") == 4   # the rest ran, some on the new worker
    assert "1 failed" in run.stdout


CLUSTER = "127.0.0.1:6379"


def two_node_cluster(commands: str) -> str:
    """A shell script (for in_loopback_namespace) that starts `ray start --head` and a second node
    joining it, one CPU each, both at 127.0.0.1 (logs in ray-head.log, ray-node2.log), runs the
    commands, and stops both nodes at exit."""
    ray_cli = shlex.quote(sys.executable) + " -m ray.scripts.scripts"
    return f"""
trap '{ray_cli} stop --force >/dev/null 2>&1 || true' EXIT
{ray_cli} start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus=1 --include-dashboard=false \\
    --temp-dir="$RAY_TMPDIR/head" --disable-usage-stats >ray-head.log 2>&1
{ray_cli} start --address={CLUSTER} --node-ip-address=127.0.0.1 --num-cpus=1 \\
    --temp-dir="$RAY_TMPDIR/node2" --disable-usage-stats >ray-node2.log 2>&1
{commands}
"""


@needs_namespace
def test_two_node_cluster(search_inputs):
    """`ray start --head` and a second `ray start --address` on this machine, each node with one
    CPU; a search with two workers runs a worker on each, and trials.json names both nodes."""
    script = two_node_cluster(search_command("out-cluster", "--address", CLUSTER, "--workers", "2", "--trials", "4"))
    run = in_loopback_namespace(script, search_inputs)
    logs = "".join((search_inputs / f).read_text()[-2000:] for f in ("ray-head.log", "ray-node2.log")
                   if (search_inputs / f).exists())
    assert run.returncode == 0, run.stdout + run.stderr + logs
    trials = trials_of(search_inputs / "out-cluster")
    assert len(trials) == 4 and all(t["status"] == "ok" for t in trials), trials
    nodes = {t["node"] for t in trials}
    assert len(nodes) == 2, nodes                            # two Ray node ids, both at 127.0.0.1
    assert all("127.0.0.1" in n for n in nodes)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_cluster_at_the_address_is_one_line(search_inputs, tmp_path, capsys, monkeypatch):
    """Nothing listens there: one line naming the address, before Ray tries for minutes; the same
    from RAY_ADDRESS. (No Ray process starts, so no namespace is needed.)"""
    address = f"127.0.0.1:{free_loopback_port()}"
    argv = ["search", str(search_inputs / "recipe.yaml"), "--eval", f"perplexity:{search_inputs / 'valid.txt'}",
            "--no-progress"]
    cli_fails(capsys, argv + ["-o", str(tmp_path / "a"), "--address", address], None, f"no Ray cluster at {address}")
    monkeypatch.setenv("RAY_ADDRESS", address)
    cli_fails(capsys, argv + ["-o", str(tmp_path / "b"), "--workers", "2"], None, f"no Ray cluster at {address}")


def test_address_must_be_host_and_port():
    with pytest.raises(MergeError, match="HOST:PORT"):
        check_reachable("nowhere")
    with pytest.raises(MergeError, match="--workers 0"):
        RayRunner(0)


@needs_namespace
def test_bench_search_quick(tmp_path):
    """`modalmerge bench search --quick`: the rows run, every trial ok, each Ray worker's memory measured."""
    run = in_loopback_namespace(f"{shlex.quote(sys.executable)} -m modalmerge bench search --quick --workers 2 "
                                f"--cache cache --out results", tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "results" / "search.json").read_text())
    assert [(r["runner"], r["workers"]) for r in result["rows"]] == [("in process", 1), ("ray", 2)]
    for row in result["rows"]:
        assert row["ok"] == row["trials"] == result["shape"]["trials"]
        assert len(row["per_worker"]) == row["workers"] and all(m["pss"] > 0 for m in row["per_worker"])
    assert len(result["rows"][1]["worker_ids"]) == 2
    assert "trials / min" in (tmp_path / "results" / "search.md").read_text()
