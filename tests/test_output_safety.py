"""Inputs are never written, and outputs are placed atomically and exclusively (issue 11, items 2-3).

Every command refuses an output that is an input, lies inside one or contains one (symlinks
resolved), with or without --overwrite; the finished output appears only where nothing is
(renameat2 NOREPLACE), --overwrite replaces only what was checked at the start and only once the
new output is complete, a lock makes a second merge into the same path fail at once, SIGTERM and
SIGHUP clean up as Ctrl-C does, a kill -9's partial folder is swept by the next run, and a full or
read-only disk is one `error:` line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import finetunes, load_sd, random_state_dict
from modalmerge.checkpoint import output as output_mod
from modalmerge.checkpoint.output import AtomicFolder, lock_path, refuse_output_over_inputs
from modalmerge.checkpoint.safetensors_io import save_file
from modalmerge.cli import main
from modalmerge.errors import MergeError
from modalmerge.methods.registry import METHODS


def save_model(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): an input must keep all of them."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def fam(tmp_path):
    """models/ holds a base, two fine-tunes and a model that no recipe names."""
    root = tmp_path / "models"
    base = random_state_dict(0)
    a, b = finetunes(base, 2)
    paths = {n: save_model(root / n, sd) for n, sd in (("base", base), ("a", a), ("b", b), ("other", a))}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": str(paths["base"]),
                                      "models": [{"path": str(paths["a"]), "name": "a"},
                                                 {"path": str(paths["b"]), "name": "b"}]}))
    return {"root": root, "paths": paths, "recipe": recipe, "tmp": tmp_path, "before": snapshot(tmp_path),
            "models": snapshot(root)}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def one_error_line(capsys, code: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def merge(recipe: Path, out: Path, *extra: str) -> int:
    return main(["merge", str(recipe), "--output", str(out), "--no-progress", *extra])


# -- inputs are never written --------------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_equal_to_an_input_is_refused(fam, capsys, overwrite):
    a = fam["paths"]["a"]
    one_error_line(capsys, merge(fam["recipe"], a, *overwrite), f"output {a} is the model 'a' ({a})", "--overwrite")
    assert snapshot(fam["tmp"]) == fam["before"] and leftovers(a) == []


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_equal_to_the_base_is_refused(fam, capsys, overwrite):
    base = fam["paths"]["base"]
    one_error_line(capsys, merge(fam["recipe"], base, *overwrite), "is the base", str(base))
    assert snapshot(fam["tmp"]) == fam["before"]


def test_output_inside_an_input_is_refused(fam, capsys):
    out = fam["paths"]["b"] / "merged"
    one_error_line(capsys, merge(fam["recipe"], out), f"output {out} lies inside the model 'b'")
    assert snapshot(fam["tmp"]) == fam["before"] and not out.exists()


@pytest.mark.parametrize("target", ["models", "tmp"])
def test_output_containing_the_inputs_is_refused_and_every_model_stays(fam, capsys, target):
    out = fam["root"] if target == "models" else fam["tmp"]
    # with --overwrite the folder holding the inputs (and "other", which no recipe names) was deleted
    one_error_line(capsys, merge(fam["recipe"], out, "--overwrite"), f"output {out} contains the")
    assert snapshot(fam["tmp"]) == fam["before"]
    assert (fam["paths"]["other"] / "model.safetensors").exists()


def test_symlinked_output_resolving_to_an_input_is_refused(fam, capsys):
    link = fam["tmp"] / "link"
    link.symlink_to(fam["paths"]["a"])
    msg = one_error_line(capsys, merge(fam["recipe"], link, "--overwrite"), f"output {link}", "is the model 'a'")
    assert str(fam["paths"]["a"]) in msg
    assert link.is_symlink() and snapshot(fam["paths"]["a"]) == snapshot(link)
    # a symlinked parent folder: the output would lie inside an input
    (fam["tmp"] / "via").symlink_to(fam["paths"]["b"])
    one_error_line(capsys, merge(fam["recipe"], fam["tmp"] / "via" / "out"), "lies inside the model 'b'")
    assert snapshot(fam["root"]) == fam["models"]
    assert not (fam["paths"]["b"] / "out").exists()


def test_other_inputs_are_protected_too(fam, capsys):
    """copy_files_from, the recipe file itself (API), a single .safetensors file and its folder."""
    tmp, paths = fam["tmp"], fam["paths"]
    cfg = tmp / "cfg"
    cfg.mkdir()
    (cfg / "config.json").write_text("{}")
    data = yaml.safe_load(fam["recipe"].read_text())
    r2 = tmp / "r2.yaml"
    r2.write_text(yaml.safe_dump({**data, "copy_files_from": str(cfg)}))
    one_error_line(capsys, merge(r2, cfg, "--overwrite"), "is the copy_files_from folder")
    assert (cfg / "config.json").read_text() == "{}"
    # a model given as one file: the file, and a folder holding it, are refused; a sibling is fine
    single = tmp / "single"
    single.mkdir()
    shutil.copy(paths["b"] / "model.safetensors", single / "b.safetensors")
    r3 = tmp / "r3.yaml"
    r3.write_text(yaml.safe_dump({**data, "models": [str(paths["a"]), str(single / "b.safetensors")]}))
    one_error_line(capsys, merge(r3, single / "b.safetensors", "--overwrite"), "is the model 'b.safetensors'")
    one_error_line(capsys, merge(r3, single, "--overwrite"), "contains the model 'b.safetensors'")
    assert (single / "b.safetensors").read_bytes() == (paths["b"] / "model.safetensors").read_bytes()
    assert merge(r3, single / "merged") == 0 and (single / "merged" / "model.safetensors").exists()
    # the Python API: the recipe file is an input as well
    from modalmerge import api

    with pytest.raises(MergeError, match="contains the recipe"):
        api.merge(fam["recipe"], tmp, overwrite=True)
    assert fam["recipe"].exists()


def test_refuse_output_over_inputs_unit(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "f").write_text("x")
    for out, how in [(tmp_path / "in", "is"), (tmp_path / "in" / "f", "is"),
                     (tmp_path / "in" / "x" / "y", "lies inside"), (tmp_path, "contains"), (Path("/"), "contains")]:
        with pytest.raises(MergeError, match=f" {how} the model "):
            refuse_output_over_inputs(out, [("model", tmp_path / "in" / "f" if out.name == "f" else tmp_path / "in")])
    refuse_output_over_inputs(tmp_path / "in2", [("model", tmp_path / "in"), None, ("x", None),
                                                 ("gone", tmp_path / "nothing"), "<memory:a>"])


def test_continual_merge_never_replaces_the_previous_merge(fam, capsys):
    tmp, paths = fam["tmp"], fam["paths"]
    prev = tmp / "s1"
    r = tmp / "opcm.yaml"
    r.write_text(yaml.safe_dump({"method": "opcm", "base": str(paths["base"]), "models": [str(paths["a"])]}))
    assert merge(r, prev) == 0
    capsys.readouterr()
    before = snapshot(prev)
    for out in (prev, prev / "next"):
        code = main(["merge", "--continual", str(prev), "--add", str(paths["b"]), "--output", str(out),
                     "--overwrite", "--no-progress"])
        one_error_line(capsys, code, f"output {out}", "the previous merge", str(prev))
        assert snapshot(prev) == before
    code = main(["merge", "--continual", str(prev), "--add", str(paths["b"]), "-o", str(paths["b"]), "--overwrite",
                 "--no-progress"])
    one_error_line(capsys, code, "is the model 'b'")
    assert main(["merge", "--continual", str(prev), "--add", str(paths["b"]), "-o", str(tmp / "s2"),
                 "--no-progress"]) == 0
    assert snapshot(prev) == before and snapshot(fam["root"]) == fam["models"]


def test_align_never_writes_its_inputs(tmp_path, capsys):
    a, b = random_state_dict(0), random_state_dict(1)
    pa, pb = save_model(tmp_path / "a", a), save_model(tmp_path / "b", b)
    before = snapshot(tmp_path)
    for out, how in ((pb, "is the model"), (pa, "is the reference"), (pa / "x", "lies inside the reference"),
                     (tmp_path, "contains the model")):
        code = main(["align", str(pb), "--to", str(pa), "-o", str(out), "--overwrite"])
        one_error_line(capsys, code, how)
        assert snapshot(tmp_path) == before


def test_extract_never_writes_its_decoupled_merge(fam, capsys):
    paths, tmp = fam["paths"], fam["tmp"]
    r = tmp / "tall.yaml"
    r.write_text(yaml.safe_dump({"method": "tall", "base": str(paths["base"]),
                                 "models": [{"path": str(paths["a"]), "name": "a"},
                                            {"path": str(paths["b"]), "name": "b"}]}))
    merged = tmp / "merged"
    assert merge(r, merged) == 0
    capsys.readouterr()
    before = snapshot(merged)
    for out, how in ((merged, "is the decoupled merge"), (merged / "decoupled" / "a", "lies inside the decoupled"),
                     (tmp, "contains the decoupled merge")):
        code = main(["extract", str(merged), "--task", "a", "-o", str(out), "--overwrite", "--no-progress"])
        one_error_line(capsys, code, how)
        assert snapshot(merged) == before


def test_msmoe_never_writes_its_model(tmp_path, capsys):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=64, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=32)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    capsys.readouterr()  # transformers' own bar
    data = tmp_path / "tokens.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": list(range(i, i + 8))}) for i in range(8)))
    before = snapshot(tmp_path)
    for out, how in ((tmp_path / "moe", "is the model"), (tmp_path / "moe" / "x", "lies inside the model"),
                     (tmp_path, "contains the"), (data, "is the calibration file")):
        code = main(["msmoe", str(tmp_path / "moe"), "-o", str(out), "--calibration-file", str(data),
                     "--loader", "tokens", "--overwrite"])
        one_error_line(capsys, code, how)
        assert snapshot(tmp_path) == before


# -- placement: atomic and exclusive ------------------------------------------------------------

def _during_merge(monkeypatch, action, method: str = "task_arithmetic"):
    """Run `action()` once, in the middle of a merge (at its third tensor)."""
    method = METHODS[method]
    real, calls = method.kernel, []

    def kernel(group, params, stats):
        calls.append(group.name)
        if len(calls) == 3:
            action()
        return real(group, params, stats)

    monkeypatch.setattr(method, "kernel", kernel)
    return calls


def _ta_recipe(fam) -> Path:
    r = fam["tmp"] / "ta.yaml"
    r.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(fam["paths"]["base"]),
                                 "models": [str(fam["paths"]["a"]), str(fam["paths"]["b"])]}))
    return r


def test_a_folder_appearing_at_the_output_during_the_merge_is_kept(fam, capsys, monkeypatch):
    out = fam["tmp"] / "out"

    def appear():
        out.mkdir()
        (out / "theirs.txt").write_text("not yours")

    calls = _during_merge(monkeypatch, appear)
    one_error_line(capsys, merge(_ta_recipe(fam), out), f"output {out} appeared while merging")
    assert len(calls) > 3  # the merge ran on, and then refused to place its result
    assert snapshot(out) == {"theirs.txt": b"not yours"} and leftovers(out) == []
    # also when what appears is an empty folder (a plain rename would replace that) or a file
    for make in (lambda: out.mkdir(), lambda: out.write_text("x")):
        shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
        _during_merge(monkeypatch, make)
        one_error_line(capsys, merge(_ta_recipe(fam), out), "appeared while merging")
        assert out.exists() and (out.is_file() or not any(out.iterdir())) and leftovers(out) == []
        out.rmdir() if out.is_dir() else out.unlink()


def test_overwrite_replaces_only_what_was_checked(fam, capsys, monkeypatch):
    out = fam["tmp"] / "out"
    assert merge(fam["recipe"], out) == 0
    elsewhere = fam["tmp"] / "moved"

    def swap():  # someone moves the old output away and puts their own folder there
        out.rename(elsewhere)
        out.mkdir()
        (out / "theirs.txt").write_text("new")

    _during_merge(monkeypatch, swap)
    one_error_line(capsys, merge(_ta_recipe(fam), out, "--overwrite"), f"output {out} was replaced by something else")
    assert snapshot(out) == {"theirs.txt": b"new"} and leftovers(out) == []
    assert (elsewhere / "model.safetensors").exists()


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(fam, capsys, monkeypatch):
    out = fam["tmp"] / "out"
    assert merge(fam["recipe"], out) == 0
    old = snapshot(out)
    seen = []
    _during_merge(monkeypatch, lambda: seen.append(snapshot(out)))
    assert merge(_ta_recipe(fam), out, "--overwrite") == 0
    assert seen == [old]  # mid-merge, the old output was whole at its path
    new = snapshot(out)
    assert new != old and "task_arithmetic" in new["README.md"].decode()
    assert leftovers(out) == [] and sorted(p.name for p in fam["tmp"].iterdir()) == \
        ["models", "out", "r.yaml", "ta.yaml"]
    # and without renameat2 (the fallback: rename aside, rename in, delete), the same
    monkeypatch.setattr(output_mod, "_renameat2_fn", False)
    seen.clear()
    _during_merge(monkeypatch, lambda: seen.append(snapshot(out)), "ties")
    assert merge(fam["recipe"], out, "--overwrite") == 0
    assert seen == [new] and snapshot(out) == old and leftovers(out) == []


def test_fallback_rename_never_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(output_mod, "_renameat2_fn", False)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    for make in (lambda p: p.mkdir(), lambda p: p.write_text("y"), lambda p: (p.mkdir(), (p / "g").write_text("z"))):
        dst = tmp_path / "dst"
        make(dst)
        with pytest.raises(FileExistsError):
            output_mod.rename_noreplace(src, dst)
        assert (src / "f").exists()
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    output_mod.rename_noreplace(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "f").read_text() == "x"


def test_a_second_merge_into_the_same_path_fails_at_once(fam, capsys):
    out = fam["tmp"] / "out"
    held = AtomicFolder(out)  # a merge in progress into `out`
    try:
        t0 = time.perf_counter()
        one_error_line(capsys, merge(fam["recipe"], out), f"output {out} is being written by another modalmerge")
        assert time.perf_counter() - t0 < 5
        one_error_line(capsys, merge(fam["recipe"], out, "--overwrite"), "being written by another")
        assert held.tmp.exists() and not out.exists()
    finally:
        held.abort()
    assert leftovers(out) == [] and not lock_path(out).exists()
    assert merge(fam["recipe"], out) == 0 and leftovers(out) == []


def _default_signals() -> None:
    """The child starts with default signal handling whatever the test runner inherited (nohup
    ignores SIGHUP; a non-interactive shell's background job ignores SIGINT)."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def _cli(*args: str, env_extra: dict | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "modalmerge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_signals, **kw)


def test_two_merges_racing_into_one_new_path(fam):
    out = fam["tmp"] / "out"
    procs = [_cli("merge", str(fam["recipe"]), "-o", str(out), "--no-progress", "--threads", "1") for _ in range(2)]
    results = [(p.wait(120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1).strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and \
        ("being written by another" in err[0] or "already exists" in err[0]), err
    assert load_sd(out) and leftovers(out) == []


# -- signals, kill -9 and the sweep ---------------------------------------------------------------

@pytest.fixture
def slow(tmp_path):
    """A merge that runs for a second or two: thousands of small tensors, one thread."""
    root = tmp_path / "big"
    g = torch.Generator().manual_seed(0)
    base = {f"l{i}.w": torch.randn(16, 16, generator=g) for i in range(6000)}
    for n, scale in (("base", 0.0), ("a", 0.1), ("b", 0.1)):
        (root / n).mkdir(parents=True)
        save_file({k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  root / n / "model.safetensors")
    r = tmp_path / "big.yaml"
    r.write_text(yaml.safe_dump({"method": "ties", "base": str(root / "base"),
                                 "models": [str(root / "a"), str(root / "b")]}))
    (tmp_path / "tmpdir").mkdir()
    return r


def _start_and_wait_for_partial(recipe: Path, out: Path) -> subprocess.Popen:
    proc = _cli("merge", str(recipe), "-o", str(out), "--no-progress", "--threads", "1",
                env_extra={"TMPDIR": str(out.parent / "tmpdir")})
    deadline = time.monotonic() + 120
    while not leftovers(out):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    return proc


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_termination_signals_clean_up(slow, sig):
    out = slow.parent / "out"
    proc = _start_and_wait_for_partial(slow, out)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err
    assert "Traceback" not in err and "nothing was written" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and leftovers(out) == []
    assert list((slow.parent / "tmpdir").iterdir()) == []  # no temporary data left in $TMPDIR


def test_kill_9_leftovers_are_swept_by_the_next_run(slow, fam):
    out = slow.parent / "out"
    proc = _start_and_wait_for_partial(slow, out)
    proc.kill()
    proc.wait(60)
    left = leftovers(out)
    assert any(".partial-" in n for n in left), left
    # things the sweep must not touch: a live process's partial, other names, a symlink to an input
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [slow.parent / f".x.partial-{live.pid}", slow.parent / ".x.partial-abc", slow.parent / ".notes"]
        for k in keep:
            k.mkdir()
            (k / "f").write_text("keep")
        link = slow.parent / ".y.partial-999999999"
        link.symlink_to(fam["paths"]["a"])
        # the next run into the same parent folder, into another name
        assert merge(fam["recipe"], slow.parent / "other") == 0
        assert leftovers(out) == []
        assert all((k / "f").read_text() == "keep" for k in keep)
        assert link.is_symlink() and (fam["paths"]["a"] / "model.safetensors").exists()
    finally:
        live.kill()
        live.wait()


def test_data_pass_scratch_lives_in_the_partial_folder(tmp_path, monkeypatch):
    """A data-aware merge's temporary statistics go inside the output's partial folder (one removal
    covers both, a kill -9 included): nothing in $TMPDIR, nothing left after success or an interrupt."""
    import tempfile

    from modalmerge.engine import executor

    seen = []
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))
    (tmp_path / "tmpdir").mkdir()
    base = random_state_dict(0, {"w": (4, 4)})
    a, = finetunes(base, 1)
    paths = {n: save_model(tmp_path / n, sd) for n, sd in (("base", base), ("a", a))}

    from modalmerge import api
    from modalmerge.engine.sinks import FolderSink

    class Stop(Exception):
        pass

    for fail in (False, True):
        out = tmp_path / f"out{fail}"
        plan = api.plan({"method": "task_arithmetic", "base": str(paths["base"]), "models": [str(paths["a"])]})
        sink = FolderSink(plan, out)
        monkeypatch.setattr(plan.method, "data", lambda params: ["fisher"])

        def fake_gather(plan_, kinds, folder, **kw):
            seen.append(Path(folder))
            assert Path(folder).parent == sink.folder.tmp
            (Path(folder) / "stats.bin").write_bytes(b"x" * 10)
            if fail:
                raise Stop
            return {}

        ex = executor.Executor(plan, gather=fake_gather)
        if fail:  # an error (or an interrupt) in the data pass
            with pytest.raises(Stop):
                ex.run(sink)
            assert not out.exists()
        else:
            ex.run(sink)
            assert not any(p.name.startswith("modalmerge-data-") for p in out.iterdir())
        assert leftovers(out) == [] and list((tmp_path / "tmpdir").iterdir()) == []
    assert len(seen) == 2


# -- full and read-only file systems ------------------------------------------------------------

def _tmpfs_available() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root (a tiny tmpfs is mounted in a private mount namespace)"
    if shutil.which("unshare") is None:
        return "needs unshare(1)"
    return None


@pytest.mark.skipif(_tmpfs_available() is not None, reason=str(_tmpfs_available()))
@pytest.mark.parametrize("case", ["full", "read-only"])
def test_full_or_read_only_file_system_is_one_line(fam, case):
    mnt = fam["tmp"] / "mnt"
    mnt.mkdir()
    if case == "full":
        # an output of ~2.5 MB on a 1 MB tmpfs
        g = torch.Generator().manual_seed(0)
        base = {f"w{i}": torch.randn(256, 256, generator=g) for i in range(10)}
        for n, s in (("base", 0.0), ("a", 0.1), ("b", 0.1)):
            save_model(fam["tmp"] / "big" / n, {k: v + s for k, v in base.items()})
        recipe = fam["tmp"] / "big.yaml"
        recipe.write_text(yaml.safe_dump({"method": "ties", "base": str(fam["tmp"] / "big" / "base"),
                                          "models": [str(fam["tmp"] / "big" / "a"), str(fam["tmp"] / "big" / "b")]}))
        remount, fragment = "", "No space left on device"
    else:
        recipe, remount, fragment = fam["recipe"], f"mount -o remount,ro {mnt} && ", "read-only file system"
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && {remount}"
              f"{sys.executable} -m modalmerge merge {recipe} -o {mnt}/out --no-progress --threads 1; "
              f"echo rc=$?; ls -A {mnt}; umount {mnt}")
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if "mount" in done.stderr and "permission denied" in done.stderr.lower():
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write the output"), done.stderr
    assert fragment.lower() in lines[0].lower() and str(mnt / "out") in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    # exit 1, and nothing at all left in the mount (no output, partial folder or lock file)
    assert done.stdout.strip().splitlines() == ["rc=1"], done.stdout
    assert not any(mnt.iterdir())  # unmounted, and nothing written under it either
