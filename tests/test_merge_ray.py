"""`modalmerge merge --ray` (issue 14, "one merge across a Ray cluster"): the output shards written by
Ray tasks equal, tensor for tensor (torch.equal) and byte for byte, those of a plain `modalmerge
merge`, on a local Ray instance with two workers and on a real two-node cluster (`ray start --head`
plus `ray start --address`); a failed or killed worker is one error line and no output; an address
where no cluster answers is one line; what --ray does not spread yet is refused in one line.

Every test that starts Ray runs it inside new network and PID namespaces whose only interface is
loopback (test_search_ray.in_loopback_namespace: root and unshare needed, skipped with the reason
otherwise), so that no Ray server listens on an external address. The group logic itself (the
statistics handed from group to group, each group applied alone) is tested in process too, without
Ray, where it runs everywhere.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import cli_fails, load_sd, perturbed, tiny_llama
from modalmerge.api import plan as plan_merge
from modalmerge.checkpoint.output import shard_layout
from modalmerge.engine.executor import Executor
from modalmerge.engine.sinks import DictSink
from modalmerge.procedures.ray_merge import output_entries

pytest.importorskip("ray")
from test_search_ray import (CLUSTER, free_loopback_port, in_loopback_namespace, needs_namespace,  # noqa: E402
                             two_node_cluster)

MERGE = f"{shlex.quote(sys.executable)} -m modalmerge merge"
SHARDS = "--out-shard-size 20k"      # the tiny Llama (107 KB) in 7 shards: 7 tensor groups
BIG_SHARDS = "--out-shard-size 8M"   # the sampled model (17 MB of bfloat16) in 3
# Ray's own C++ log lines on stderr: in a namespace without a network, ray.init warns that it cannot
# find an external address (`[2026-12-03 10:25:47,538 W 6 6] network_util.cc:330: ...`)
RAY_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] ")


def recipe(root: Path, name: str, method: str, models: list[str], params: dict, base: str = "base") -> str:
    (root / f"{name}.yaml").write_text(yaml.safe_dump({
        "method": method, "base": str(root / base), "models": [{"path": str(root / m)} for m in models],
        "params": params}, sort_keys=False))
    return f"{name}.yaml"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tiny Llama base and two fine-tunes (float32), a fine-tune with a NaN, and a model large
    enough (8.4 M merged parameters, bfloat16, one tensor cut into row blocks) that the statistics
    pass samples; recipes for TIES (a global trim threshold: a statistics pass) and task arithmetic."""
    root = tmp_path_factory.mktemp("merge-ray")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    for i in range(2):
        perturbed(base, 20 + i).save_pretrained(root / f"ft{i}")
    (root / "ft_nan").mkdir()
    weights = load_file(root / "ft1" / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, root / "ft_nan" / "model.safetensors", metadata={"format": "pt"})
    (root / "ft_nan" / "config.json").write_text((root / "ft1" / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (4096, 1536), "b.weight": (1024, 1024), "c.weight": (2048, 512), "norm.weight": (1024,)}
    big = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    for name, scale in (("big_base", 0.0), ("big_ft0", 0.05), ("big_ft1", 0.05)):
        (root / name).mkdir()
        tensors = {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in big.items()}
        tensors["position_ids"] = torch.arange(64)  # not floating point: copied
        save_file(tensors, root / name / "model.safetensors", metadata={"format": "pt"})
    recipe(root, "ties", "ties", ["ft0", "ft1"], {"density": 0.3})
    recipe(root, "task_arithmetic", "task_arithmetic", ["ft0", "ft1"], {"lambda": 0.7})
    recipe(root, "ties_nan", "ties", ["ft0", "ft_nan"], {"density": 0.3})
    recipe(root, "tall", "tall", ["ft0", "ft1"], {})
    recipe(root, "big_ties", "ties", ["big_ft0", "big_ft1"], {"density": 0.2}, base="big_base")
    return root


def assert_same_output(plain: Path, ray: Path) -> None:
    """Every tensor equal (torch.equal, same dtype), the same shard files byte for byte, the same
    index, config and model card."""
    names = sorted(p.name for p in plain.iterdir())
    assert sorted(p.name for p in ray.iterdir()) == names
    a, b = load_sd(plain), load_sd(ray)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for name in names:
        assert (plain / name).read_bytes() == (ray / name).read_bytes(), name


def ray_line(stdout: str) -> dict[str, int]:
    """The merge's `ray: shards 7, workers 2, ...` line as numbers."""
    line = next(x for x in stdout.splitlines() if x.startswith("ray: "))
    return {k: int(v) for k, v in (part.split() for part in line.removeprefix("ray: ").split(", "))}


# -- without Ray: the groups' logic ----------------------------------------------------------------

@pytest.mark.parametrize("method, params", [("ties", {"density": 0.3}), ("ties", {"density": 0.3, "exact": True}),
                                            ("task_arithmetic", {"lambda": 0.7})])
def test_groups_run_alone_equal_the_whole_merge(inputs, method, params):
    """What each Ray task runs, in process: the statistic handed from group to group in plan order
    (each group a fresh executor over its tensors), then each group applied alone with the
    result; every tensor equals the plain executor's (small row blocks: tensors cut in several)."""
    exact = params.pop("exact", False)
    planned = plan_merge({"method": method, "base": str(inputs / "base"), "params": params,
                          "models": [{"path": str(inputs / "ft0")}, {"path": str(inputs / "ft1")}]}, chunk_elems=512)
    assert any(len(t.chunks) > 1 for t in planned.merged)
    whole = DictSink(planned)
    Executor(planned, exact_stats=exact, progress=False).run(whole)

    groups = [[n for n, _ in entries] for _, entries in shard_layout(output_entries(planned), max_shard_bytes=20_000)]
    assert len(groups) > 3

    def observe(stat, prior):
        for names in groups:
            group = Executor(planned, exact_stats=exact, progress=False, tensors=names)
            with group.passes():
                stat = group.observe(stat, prior)
        return stat

    driver = Executor(planned, exact_stats=exact, progress=False)
    with driver.passes():
        stats = driver.statistics(observe=observe)
    parts = DictSink(planned)
    for names in groups:
        group = Executor(planned, exact_stats=exact, progress=False, tensors=names)
        with group.passes():
            group.apply(parts, stats)
    assert parts.tensors.keys() == whole.tensors.keys()
    for name, tensor in whole.tensors.items():
        assert torch.equal(parts.tensors[name], tensor), name


# -- one line, before Ray starts -------------------------------------------------------------------

def test_no_cluster_at_the_address_is_one_line(inputs, tmp_path, capsys):
    address = f"127.0.0.1:{free_loopback_port()}"
    out = tmp_path / "out"
    cli_fails(capsys, ["merge", str(inputs / "ties.yaml"), "-o", str(out), "--ray", "--address", address], out,
              f"no Ray cluster at {address}")


def test_what_ray_does_not_spread_is_refused(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    cli_fails(capsys, ["merge", str(inputs / "tall.yaml"), "-o", str(out), "--ray"], out,
              "--ray: method tall writes a decoupled part")
    cli_fails(capsys, ["merge", str(inputs / "ties.yaml"), "-o", str(out), "--workers", "2"], out, "--ray")
    cli_fails(capsys, ["merge", str(inputs / "ties.yaml"), "-o", str(out), "--ray", "--workers", "0"], out,
              "--workers 0")


# -- on Ray ---------------------------------------------------------------------------------------

CASES = [("ties", SHARDS, ""), ("task_arithmetic", SHARDS, ""), ("big_ties", BIG_SHARDS, ""),
         ("big_ties", BIG_SHARDS, "--exact-stats")]


def case_commands(ray_flags: str) -> str:
    """A plain merge and a --ray merge of each case, one torch thread per process in both."""
    lines = []
    for i, (name, shards, extra) in enumerate(CASES):
        flags = f"{name}.yaml {shards} {extra} --threads 1 --no-progress"
        lines.append(f"{MERGE} {flags} -o plain-{i}")
        lines.append(f"{MERGE} {flags} -o ray-{i} --ray {ray_flags} >ray-{i}.log")
    return "\n".join(lines)


@needs_namespace
def test_local_ray_merge_is_bit_identical(inputs):
    """A local Ray instance with two workers: TIES (global threshold; sampled on the larger model, and
    exact), task arithmetic; each output equals the plain merge's."""
    run = in_loopback_namespace(case_commands("--workers 2"), inputs)
    assert run.returncode == 0, run.stdout + run.stderr
    for i, (name, _, _) in enumerate(CASES):
        assert_same_output(inputs / f"plain-{i}", inputs / f"ray-{i}")
        used = ray_line((inputs / f"ray-{i}.log").read_text())
        assert used["workers"] == 2 and used["threads"] == 1 and used["nodes"] == 1, (name, used)
    assert ray_line((inputs / "ray-0.log").read_text())["shards"] == 7
    assert json.loads((inputs / "ray-0" / "model.safetensors.index.json").read_text())["weight_map"]


@needs_namespace
def test_two_node_cluster_merge_is_bit_identical(inputs):
    """`ray start --head` and a second `ray start --address` on this machine, one CPU each: every
    output equals the plain merge's, and shards are written by tasks on both nodes."""
    script = two_node_cluster(case_commands(f"--address {CLUSTER} --workers 2")
                              .replace("plain-", "cplain-").replace("ray-", "cray-"))
    run = in_loopback_namespace(script, inputs)
    assert run.returncode == 0, run.stdout + run.stderr
    nodes = []
    for i, (name, _, _) in enumerate(CASES):
        assert_same_output(inputs / f"cplain-{i}", inputs / f"cray-{i}")
        used = ray_line((inputs / f"cray-{i}.log").read_text())
        assert used["workers"] == 2, (name, used)
        nodes.append(used["nodes"])
    # where the tasks run is Ray's choice: a quick shard's node may be free again before the next
    # task is placed, so one merge may use one node; across the four merges both nodes wrote shards
    assert max(nodes) == 2, nodes


@needs_namespace
def test_a_failed_or_killed_worker_is_one_line_and_no_output(inputs):
    """A tensor with a NaN: the worker's error, the line a plain merge says. A worker killed while it
    writes its shard: one line naming the shard. Neither leaves an output or a partial folder."""
    nan = f"{MERGE} ties_nan.yaml {SHARDS} --threads 1 --no-progress"
    big = f"{MERGE} big_ties.yaml {BIG_SHARDS} --threads 1 --no-progress --ray --workers 2"
    script = f"""
{nan} -o nan-plain 2>nan-plain.err || true
{nan} -o nan-ray --ray --workers 2 2>nan-ray.err || echo "exit $?" >nan-ray.code
{big} -o killed 2>killed.err &
merge=$!
until pid=$(pgrep -f -o 'ray::[a]pply_group'); do sleep 0.02; done
kill -9 "$pid"
wait "$merge" || echo "exit $?" >killed.code
"""
    run = in_loopback_namespace(script, inputs)
    assert run.returncode == 0, run.stdout + run.stderr
    plain_error = (inputs / "nan-plain.err").read_text().strip()
    assert plain_error.startswith("error: ") and "contains NaN or Inf" in plain_error
    for name, fragment in (("nan-ray", plain_error), ("killed", "the Ray worker running output shard model-")):
        err = (inputs / f"{name}.err").read_text()
        assert (inputs / f"{name}.code").read_text().strip() == "exit 1", err
        ours = [line for line in err.splitlines() if not RAY_LOG_LINE.match(line)]
        assert len(ours) == 1 and ours[0].startswith("error: ") and fragment in ours[0], err
        assert not (inputs / name).exists()
        assert not [p.name for p in inputs.iterdir() if p.name.startswith(f".{name}.")]
