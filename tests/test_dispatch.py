"""One way a merge runs (issue 12, items 1 and 4): the procedure comes from `Method.runs` alone, the
CLI calls the API, and a library merge leaves no process state behind (malloc settings, threads).

Written against the public API and `Method.runs`; the module that holds the procedure tables is
found through the API (run_module), wherever it lives."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import shutil
import textwrap
import threading
import typing
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import modalmerge
from conftest import finetunes, load_sd, random_state_dict
from modalmerge import api, cli
from modalmerge.errors import MergeError
from modalmerge.methods.base import Method
from modalmerge.methods.registry import METHODS


def run_module():
    """The module the API hands a merge to (procedures/run.py now; procedures/ after the move): the one
    api.py uses that holds the procedure table."""
    for value in vars(api).values():
        module = value if inspect.ismodule(value) else inspect.getmodule(value)
        if module is not None and hasattr(module, "PROCEDURES") and hasattr(module, "DESCRIPTIONS"):
            return module
    raise AssertionError("api.py uses no module with PROCEDURES and DESCRIPTIONS")


def executor_module():
    return importlib.import_module("modalmerge.engine.executor")


KINDS = typing.get_args(typing.get_type_hints(Method)["runs"])
METHOD_NAMES = frozenset(METHODS) | {alias for m in METHODS.values() for alias in m.mergekit_names}


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def ties_recipe(family) -> dict:
    return {"method": "ties", "base": str(family["base"]),
            "models": [str(family["ft0"]), str(family["ft1"])], "params": {"density": 0.5}}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def modalmerge_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("modalmerge")]


def threads_left(before: set[int]) -> list[str]:
    """modalmerge threads started since `before` (idents) that are still alive after a moment."""
    started = [t for t in modalmerge_threads() if t.ident not in before]
    for t in started:
        t.join(timeout=5)
    return [t.name for t in started if t.is_alive()]


def idents() -> set[int]:
    return {t.ident for t in modalmerge_threads()}


# -- 1. no method name in any dispatch -----------------------------------------------------------

COMPARING = (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)
# a method's name, compared: plan.method.name, method.name, m.name, recipe.method
NAME_OF_METHOD = re.compile(r"(^|\.)(method|m)\.name$|(^|\.)recipe\.method$")


def name_dispatches(source: str, names=METHOD_NAMES) -> list[str]:
    """The places in `source` that choose by a method's name: a name string (or a tuple of them)
    compared or matched; a method's `.name` compared, or a table looked up by it; a method object
    compared by identity (`plan.method is MMER`). Strings elsewhere (error messages, arguments, a
    report's keys) are fine."""
    tree = ast.parse(source)

    def names_in(node) -> bool:
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str) and node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names_in(e) for e in node.elts)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("frozenset", "set"):
            return any(names_in(a) for a in node.args)
        return False

    # NAMES = ("mmer", "opcm") at any level, compared later through the variable
    tables = {t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
              and node.value is not None and names_in(node.value)
              for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}

    def method_object(node) -> bool:
        ident = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        return ident.isupper() and ident.lower() in names

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, COMPARING) for op in node.ops):
            for operand in (node.left, *node.comparators):
                if (names_in(operand) or (isinstance(operand, ast.Name) and operand.id in tables)
                        or NAME_OF_METHOD.search(ast.unparse(operand)) or method_object(operand)):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
                    break
        elif isinstance(node, ast.match_case):
            for pattern in ast.walk(node.pattern):
                if isinstance(pattern, ast.MatchValue) and names_in(pattern.value):
                    found.append(f"line {pattern.lineno}: case {ast.unparse(pattern.value)}")
        elif isinstance(node, ast.Subscript) and NAME_OF_METHOD.search(ast.unparse(node.slice)):
            found.append(f"line {node.lineno}: a table looked up by method name {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and node.args and NAME_OF_METHOD.search(ast.unparse(node.args[0]))):
            found.append(f"line {node.lineno}: a table looked up by method name {ast.unparse(node)}")
    return found


def dispatch_sources() -> dict[str, Path]:
    modules = {"api": api, "cli": cli, "commands.msmoe": importlib.import_module("modalmerge.commands.msmoe"),
               "run": run_module()}
    return {name: Path(m.__file__) for name, m in modules.items()}


@pytest.mark.parametrize("module", ["api", "cli", "commands.msmoe", "run"])
def test_no_method_name_in_any_dispatch(module):
    path = dispatch_sources()[module]
    found = name_dispatches(path.read_text())
    assert not found, f"{path} chooses by method name:\n" + "\n".join(found)


def test_the_name_check_finds_what_it_should_and_nothing_else():
    bad = textwrap.dedent('''
        SPECIAL = ("mmer", "opcm")
        def f(plan, recipe, args, name):
            if recipe.method == "mmer": pass
            if "opcm" != plan.method.name: pass
            if args.method in ("msmoe", "ties"): pass
            if plan.method.name == name: pass
            if recipe.method in {"dare_ties"}: pass
            if name in SPECIAL: pass
            if plan.method is MMER: pass
            run = PROCEDURES[plan.method.name]
            run = PROCEDURES.get(recipe.method, stream)
            match name:
                case "slerp": pass
    ''')
    assert len(name_dispatches(bad)) == 10, name_dispatches(bad)
    fine = textwrap.dedent('''
        def f(plan, name, report):
            if plan.method.runs == "composed": pass
            if report.procedure == "whole_model": pass
            if name == "storage": pass
            raise MergeError(f"method mmer {plan.method.name} needs a folder: use opcm's ...")
            parse_recipe(recipe, "msmoe")
            get_method("ties")
            report.statistics["msmoe"] = {"msmoe": report}
            run = PROCEDURES[plan.method.runs]
    ''')
    assert name_dispatches(fine) == []


# -- 2. every kind of procedure has one, and is used ---------------------------------------------

def test_every_kind_has_a_procedure_and_a_description():
    run = run_module()
    assert set(KINDS) == {"streaming", "composed", "sequential", "whole_model"}
    assert set(run.PROCEDURES) == set(KINDS) and set(run.DESCRIPTIONS) == set(KINDS)
    assert all(callable(run.PROCEDURES[k]) and callable(run.DESCRIPTIONS[k]) for k in KINDS)


def test_every_method_runs_a_known_kind_and_every_kind_is_used():
    assert all(m.runs in KINDS for m in METHODS.values()), {n: m.runs for n, m in METHODS.items()}
    used = {m.runs for m in METHODS.values()}
    # each kind exists for a method that needs it: a kind no method uses is dead code in the tables
    assert used == set(KINDS), set(KINDS) - used
    assert dataclasses.fields(Method)  # Method stays a dataclass whose `runs` the tables read
    assert METHODS["ties"].runs == "streaming" and METHODS["mmer"].runs == "composed"
    assert METHODS["opcm"].runs == "sequential" and METHODS["msmoe"].runs == "whole_model"


# -- 3. the CLI calls the API --------------------------------------------------------------------

class Recorder:
    """Wraps an API function: records each call, then calls it."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


def test_cli_merge_calls_the_api_once_and_writes_what_the_api_writes(llama_family, tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", ties_recipe(llama_family))
    modalmerge.merge(recipe, tmp_path / "api")
    plan, merge, describe = Recorder(api.plan), Recorder(api.merge), Recorder(api.describe)
    monkeypatch.setattr(api, "plan", plan)
    monkeypatch.setattr(api, "merge", merge)
    monkeypatch.setattr(api, "describe", describe)
    monkeypatch.setattr(executor_module(), "keep_freed_memory_for_reuse", lambda: None)  # no process state here
    assert cli.main(["merge", str(recipe), "-o", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert len(plan.calls) == 1 and len(merge.calls) == 1 and not describe.calls
    assert merge.calls[0][0][1] == str(tmp_path / "cli")
    assert_same_tensors(load_sd(tmp_path / "cli"), load_sd(tmp_path / "api"))
    # --dry-run: planned and described by the API, nothing merged
    assert cli.main(["merge", str(recipe), "--dry-run"]) == 0
    assert len(plan.calls) == 2 and len(describe.calls) == 1 and len(merge.calls) == 1
    assert "method      ties" in capsys.readouterr().out


# -- 4. no hidden process state ------------------------------------------------------------------

@pytest.fixture
def malloc_tuning(monkeypatch) -> list:
    """Records calls of the CLI's malloc tuning instead of changing this process's malloc."""
    calls = []
    monkeypatch.setattr(executor_module(), "keep_freed_memory_for_reuse", lambda: calls.append(1))
    return calls


def test_library_merges_leave_malloc_and_threads_alone(llama_family, tmp_path, malloc_tuning):
    before = idents()
    report = modalmerge.merge(ties_recipe(llama_family), tmp_path / "out")
    assert report.merged_tensors > 0
    assert threads_left(before) == []
    base = random_state_dict(0)
    merged = modalmerge.merge_state_dicts("ties", finetunes(base, 2), base, {"density": 0.5})
    assert merged.keys() == base.keys()
    assert threads_left(before) == []
    assert malloc_tuning == []  # neither library call tuned malloc


def test_the_cli_opts_in_to_malloc_tuning_on_the_cpu(llama_family, tmp_path, malloc_tuning):
    recipe = write_recipe(tmp_path / "r.yaml", ties_recipe(llama_family))
    assert cli.main(["merge", str(recipe), "--dry-run"]) == 0
    assert malloc_tuning == []  # a dry run allocates nothing worth it
    before = idents()
    assert cli.main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert malloc_tuning == [1]
    assert threads_left(before) == []


def nan_folder(src: Path, dst: Path, tensor: str) -> Path:
    """A copy of model folder `src` whose tensor `tensor` holds a NaN."""
    shutil.copytree(src, dst)
    sd = load_sd(src)
    sd[tensor] = sd[tensor].clone()
    sd[tensor][0, 0] = float("nan")
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])  # met in the apply pass / in the statistics pass
def test_a_merge_that_fails_midway_leaves_no_threads(llama_family, tmp_path, malloc_tuning, method):
    bad = nan_folder(llama_family["ft1"], tmp_path / "bad", "lm_head.weight")
    before = idents()
    recipe = {"method": method, "base": str(llama_family["base"]),
              "models": [str(llama_family["ft0"]), {"path": str(bad), "name": "bad"}]}
    with pytest.raises(MergeError, match="'bad'.*NaN or Inf"):
        modalmerge.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert threads_left(before) == []
    base = load_sd(llama_family["base"])
    with pytest.raises(MergeError, match="NaN or Inf"):
        modalmerge.merge_state_dicts(method, {"good": load_sd(llama_family["ft0"]), "bad": load_sd(bad)}, base)
    assert threads_left(before) == []
    assert malloc_tuning == []


# The exact per-tensor selection of the eager kernels (ops/sparsify.py kth_largest_magnitudes, rows
# of >= 2^18 elements) shares rows over the merge's kernel threads, which end with the merge.
def test_eager_selection_threads_do_not_outlive_the_merge(monkeypatch):
    monkeypatch.setenv("MODALMERGE_FUSED", "0")  # the eager kernels: the selection the C path does not use
    base = random_state_dict(0, {"w": (512, 1024), "b": (8,)})
    modalmerge.merge_state_dicts("ties", finetunes(base, 2), base, {"density": 0.5, "scope": "tensor"},
                                 exact_stats=True)
    for t in modalmerge_threads():
        t.join(timeout=5)
    assert [t.name for t in modalmerge_threads() if t.is_alive()] == []


# -- 5. the same merge by every entry point ------------------------------------------------------

def test_streaming_method_by_every_entry_point(llama_family, tmp_path, malloc_tuning):
    recipe = ties_recipe(llama_family)
    report = modalmerge.merge(recipe, tmp_path / "api")
    assert report.procedure == METHODS["ties"].runs == "streaming"
    assert modalmerge.describe(modalmerge.plan(recipe))["method"] == "ties"
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert cli.main(["merge", str(path), "-o", str(tmp_path / "cli"), "--no-progress"]) == 0
    folder = load_sd(tmp_path / "api")
    assert_same_tensors(load_sd(tmp_path / "cli"), folder)
    in_memory = modalmerge.merge_state_dicts(
        "ties", {"ft0": load_sd(llama_family["ft0"]), "ft1": load_sd(llama_family["ft1"])},
        load_sd(llama_family["base"]), {"density": 0.5})
    assert_same_tensors(in_memory, folder)


@pytest.fixture(scope="module")
def mllm_family(tmp_path_factory):
    from tiny_mllm import build_family

    return build_family(tmp_path_factory.mktemp("dispatch-mllm") / "models")


def test_composed_method_streams_in_memory_and_composes_folders(mllm_family, tmp_path):
    from tiny_mllm import recipe

    tasks = ("vision", "math")
    r = recipe(mllm_family, tasks)
    report = modalmerge.merge(r, tmp_path / "composed", exact_stats=True)
    assert report.procedure == METHODS["mmer"].runs == "composed"
    assert (tmp_path / "composed" / "modalities" / "vision").is_dir()
    assert modalmerge.describe(modalmerge.plan(r))["method"] == "mmer"
    # state dicts have no parts to split: the same language-model merge, streamed
    in_memory = modalmerge.merge_state_dicts("mmer", {t: mllm_family["llm"][t] for t in tasks},
                                             mllm_family["base_sd"], exact_stats=True)
    folder = load_sd(tmp_path / "composed")
    assert in_memory.keys() == folder.keys()
    for name in folder:
        assert torch.allclose(in_memory[name], folder[name], atol=1e-6), name


def test_sequential_method_merges_folders_only(llama_family, tmp_path, malloc_tuning):
    recipe = {"method": "opcm", "base": str(llama_family["base"]), "params": {"alpha": 0.5},
              "models": [str(llama_family["ft0"]), str(llama_family["ft1"])]}
    report = modalmerge.merge(recipe, tmp_path / "api")
    assert report.procedure == METHODS["opcm"].runs == "sequential"
    assert (tmp_path / "api" / "continual" / "manifest.json").exists()
    assert modalmerge.describe(modalmerge.plan(recipe))["method"] == "opcm"
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert cli.main(["merge", str(path), "-o", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert_same_tensors(load_sd(tmp_path / "cli"), load_sd(tmp_path / "api"))


@pytest.mark.parametrize("method, why", [("opcm", "one at a time"), ("msmoe", "loads and runs a whole model")])
def test_state_dicts_refuse_folder_only_methods_in_one_line(method, why):
    assert METHODS[method].runs in ("sequential", "whole_model")
    base = random_state_dict(0)
    before = idents()
    with pytest.raises(MergeError) as error:
        modalmerge.merge_state_dicts(method, finetunes(base, 1), base if method == "opcm" else None)
    message = str(error.value)
    assert "\n" not in message and f"method {method}" in message and why in message, message
    assert "modalmerge.merge(" in message  # the fix: merge model folders
    assert threads_left(before) == []
