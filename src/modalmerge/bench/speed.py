"""`modalmerge bench speed`: wall time and peak memory of merges against an I/O floor.

Synthetic Llama-shaped checkpoints (a base and N fine-tunes = base + small random deltas) are
built once into a cache folder, streamed tensor by tensor so building never holds a model in
memory. Every measurement runs in a fresh subprocess: the merge through the CLI, and two floors,
which read every input tensor of every model with the same reader and write an output of the
same size with the same writer, without arithmetic: the **floor** one after the other (the
issue's yardstick, as in every earlier run), the **overlapped floor** with the executor's overlap
(the next tensor read in a thread, the last one written in another), which a merge can beat
only by chance. Peak RSS is the child's own maximum resident
set (its VmHWM, read as it exits), wall time is measured around the child. Each measurement is repeated and
the median reported.

With `--mergekit [DIR]`, every method row that mergekit 0.1.5 can express (its Method.mergekit
forms; bench/mergekit_recipe.py translates the native recipe back and checks the round trip) is
also run through `python -m mergekit.scripts.run_yaml` in a fresh process, right after the
modalmerge run of the same repeat, with the same thread count, measured the same way; the two
outputs of the first repeat are compared tensor by tensor (max |difference|, read with the
safetensors library), so a row says whether the two tools made the same model.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CACHE_VERSION = 1
DELTA_SCALE = 0.1        # fine-tune deltas relative to the base's init std
INIT_STD = 0.02          # Llama's initializer_range
TARGETS = {"task_arithmetic": 1.3, "ties": 2.0}  # wall time over the floor (issue)
OVERLAPPED = "floor:overlapped"  # the floor with the executor's overlap of reading and writing
RSS_TARGET_BYTES = 2.5e9


@dataclass(frozen=True)
class Shape:
    hidden: int = 1024
    layers: int = 24
    vocab: int = 32000
    intermediate: int | None = None   # default 4 × hidden (≈ 470M parameters at the defaults)
    models: int = 8

    @property
    def ffn(self) -> int:
        return self.intermediate or 4 * self.hidden

    @property
    def key(self) -> str:
        return f"llama-h{self.hidden}-l{self.layers}-v{self.vocab}-i{self.ffn}-bf16-v{CACHE_VERSION}"

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, f = self.hidden, self.ffn
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (h,)),
                    (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                    (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                    (p + "mlp.down_proj.weight", (h, f))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def parameters(self) -> int:
        total = 0
        for _, s in self.tensors():
            n = 1
            for d in s:
                n *= d
            total += n
        return total

    def config(self) -> dict[str, Any]:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.ffn, "num_hidden_layers": self.layers,
                "num_attention_heads": max(1, self.hidden // 64), "num_key_value_heads": max(1, self.hidden // 64),
                "vocab_size": self.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


QUICK = Shape(hidden=256, layers=4, vocab=4096, models=3)
DEFAULT_METHODS = ["linear", "task_arithmetic", "ties:scope=global", "ties:scope=tensor"]


def _seed(*parts: Any) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def build_checkpoints(shape: Shape, cache: Path, log=print) -> dict[str, Path]:
    """The base and fine-tunes for `shape` in `cache`, built on first use.

    Tensor by tensor: the base tensor is drawn once and every model's version of it written
    straight to its file, so at most one tensor (fp32) and its deltas are in memory.
    """
    import torch

    from ..checkpoint.safetensors_io import TensorMeta

    names = ["base"] + [f"ft{i}" for i in range(shape.models)]
    root = Path(cache) / shape.key
    folders = {n: root / n for n in names}
    # a folder only appears (by rename) once its file is complete; seeds are per model and tensor,
    # so a larger --models adds fine-tunes to the same cache
    todo = [n for n in names if not (folders[n] / "model.safetensors").exists()]
    if not todo:
        return folders
    log(f"building {len(todo)} synthetic checkpoints ({shape.parameters / 1e6:.0f}M parameters each, bfloat16) "
        f"in {root}")
    t0 = time.perf_counter()
    entries = [(n, TensorMeta(s, torch.bfloat16)) for n, s in shape.tensors()]
    writers = {}
    try:
        _write_checkpoints(shape, root, todo, entries, writers, folders)
    except BaseException:  # an error or an interrupt (SIGTERM included): no partial folders left
        for tmp, _ in writers.values():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"built in {time.perf_counter() - t0:.0f} s")
    return folders


def _write_checkpoints(shape, root: Path, todo: list[str], entries, writers: dict, folders: dict) -> None:
    import torch

    from ..checkpoint.safetensors_io import SafetensorsStreamWriter

    for n in todo:
        tmp = root / f".{n}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writers[n] = (tmp, None)
        (tmp / "config.json").write_text(json.dumps(shape.config(), indent=2))
        writers[n] = (tmp, SafetensorsStreamWriter(tmp / "model.safetensors", entries))
    for tname, s in shape.tensors():
        g = torch.Generator().manual_seed(_seed("base", tname))
        if len(s) == 1:   # norms: around 1
            base = 1.0 + INIT_STD * torch.randn(s, generator=g)
        else:
            base = INIT_STD * torch.randn(s, generator=g)
        for n, (_, w) in writers.items():
            if n == "base":
                w.write(tname, base.to(torch.bfloat16))
                continue
            g = torch.Generator().manual_seed(_seed(n, tname))
            w.write(tname, base.add(torch.randn(s, generator=g), alpha=DELTA_SCALE * INIT_STD).to(torch.bfloat16))
        del base
    for n, (tmp, w) in writers.items():
        w.close()
        shutil.rmtree(folders[n], ignore_errors=True)
        os.replace(tmp, folders[n])


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """`ties:scope=tensor,density=0.2` → ("ties", {"scope": "tensor", "density": 0.2})."""
    import yaml

    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        params[k.strip()] = yaml.safe_load(v)
    return name, params


MERGEKIT_SUFFIX = "@mergekit"   # `ties@mergekit:density=0.2`: a row given as mergekit's recipe


def method_of(spec: str):
    """The Method a row's spec names (a mergekit name for a NAME@mergekit spec)."""
    from ..methods.registry import get_method, mergekit_method

    name = parse_method(spec)[0]
    if name.endswith(MERGEKIT_SUFFIX):
        return mergekit_method(name[: -len(MERGEKIT_SUFFIX)])
    return get_method(name)


def recipe_for(spec: str, folders: dict[str, Path]) -> dict[str, Any]:
    """The native recipe of a row: `name:k=v,...` with native parameters, or `name@mergekit:k=v,...`
    with mergekit's name and parameters (translated as `modalmerge merge` translates a mergekit
    recipe, mergekit's defaults included). A method that takes at most k models merges the first
    k fine-tunes."""
    name, params = parse_method(spec)
    method = method_of(spec)
    models = [str(p) for n, p in folders.items() if n != "base"][: method.max_models]
    if name.endswith(MERGEKIT_SUFFIX):
        return _from_mergekit_spec(name[: -len(MERGEKIT_SUFFIX)], params, models, str(folders["base"]))
    if name == "task_arithmetic":
        params.setdefault("lambda", 0.3)
    recipe = {"method": name, "models": models, "params": params, "dtype": "bfloat16"}
    if method.base != "forbidden":
        recipe["base"] = str(folders["base"])
    return recipe


def _from_mergekit_spec(mk_name: str, params: dict[str, Any], models: list[str], base: str) -> dict[str, Any]:
    from ..engine.recipe import mergekit_form, parse_recipe

    method, form = mergekit_form(mk_name)
    mk = {"merge_method": mk_name,
          "models": [{"model": p, "parameters": {"weight": 1.0} if method.weighted else {}} for p in models],
          "parameters": params, "dtype": "float32", "out_dtype": "bfloat16"}
    if method.base == "forbidden":
        mk["base_model"] = models[0]    # mergekit's base_model is the first input (SLERP's t = 0 end)
    elif not form.base_is_input:        # else mergekit would average the base with the models
        mk["base_model"] = base
    return parse_recipe(mk, f"bench speed: {mk_name}{MERGEKIT_SUFFIX}").model_dump(
        exclude={"source_format", "source_text"})


@dataclass
class Run:
    seconds: float
    peak_rss: int          # bytes
    returncode: int
    cpu_seconds: float = 0.0   # user + system: less sensitive than wall time to a busy machine


@dataclass
class Row:
    name: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def cpu_seconds(self) -> float:
        return statistics.median(r.cpu_seconds for r in self.runs)

    @property
    def peak_rss(self) -> int:
        return int(statistics.median(r.peak_rss for r in self.runs))


# The measured child reports its own VmHWM (peak RSS of its address space since exec) at exit.
# wait4's ru_maxrss would also count the parent's memory: the kernel carries the spawning
# process's high-water mark into the child's across fork/exec.
_LAUNCH = """
import atexit, runpy, sys
def _hwm(path=sys.argv[1]):
    with open('/proc/self/status') as f:
        kb = next((line.split()[1] for line in f if line.startswith('VmHWM:')), None)
    if kb:
        with open(path, 'w') as out:
            out.write(kb)
atexit.register(_hwm)
mode, target = sys.argv[2], sys.argv[3]
sys.argv = [target] + sys.argv[4:]
if mode == '-m':
    runpy.run_module(target, run_name='__main__', alter_sys=True)
else:
    exec(compile(target, '<string>', 'exec'), {'__name__': '__main__'})
"""


def measure(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> Run:
    """Run `python -m module ...` or `python -c code ...` (argv = ["-m", module, ...]) as a fresh
    process: its wall time, CPU time and peak RSS."""
    hwm = Path(tempfile.mkstemp(prefix="modalmerge-hwm-")[1])
    try:
        with open(log_path, "ab") as log:
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, str(hwm), *argv],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:  # interrupted (Ctrl-C, SIGTERM): the child merge ends (and cleans up) too
                proc.terminate()
                proc.wait()
                raise
            seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        text = hwm.read_text().strip()
        # without /proc (or killed before atexit): the rusage figure, an upper bound (KiB on Linux)
        peak = int(text) * 1024 if text else usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    finally:
        hwm.unlink(missing_ok=True)
    return Run(seconds, peak, proc.returncode, usage.ru_utime + usage.ru_stime)


def floor(inputs: list[str], output: str, overlap: bool = False) -> None:
    """Read every tensor of every input with the merge's reader; write an output of the base's
    size with its writer. No arithmetic: what any merge of these models must at least spend.
    `overlap`: read the next tensor in a thread and write in another while the main thread
    waits, as the executor does (one read and one write in flight)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..checkpoint.safetensors_io import SafetensorsFile, SafetensorsStreamWriter

    files = [SafetensorsFile(Path(p) / "model.safetensors") for p in inputs]
    names = files[0].names()
    Path(output).mkdir(parents=True, exist_ok=True)
    writer = SafetensorsStreamWriter(Path(output) / "model.safetensors", [(n, files[0].meta(n)) for n in names])

    def read(name: str):
        tensor = None
        for f in files:
            tensor = f.read(name)
        return tensor

    if not overlap:
        for name in names:
            writer.write(name, read(name))
    else:
        with ThreadPoolExecutor(1) as reading, ThreadPoolExecutor(1) as writing:
            next_read, written = reading.submit(read, names[0]), None
            for i, name in enumerate(names):
                tensor = next_read.result()
                if i + 1 < len(names):
                    next_read = reading.submit(read, names[i + 1])
                if written is not None:
                    written.result()
                written = writing.submit(writer.write, name, tensor)
            written.result()
    writer.close()


@dataclass
class Mergekit:
    """How `bench speed` runs mergekit: `path`, a folder put first on the child's PYTHONPATH (None:
    the mergekit this Python imports), and extra run_yaml flags."""

    path: str | None = None
    args: list[str] = field(default_factory=list)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base, HF_HUB_OFFLINE="1")   # local folders only: never the network
        if self.path:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.path, base.get("PYTHONPATH")]))
        return env

    def command(self, config: Path, out: Path, threads: int | None) -> list[str]:
        # --no-copy-tokenizer: the synthetic checkpoints have none; --quiet: no progress bars (the
        # merge runs with --no-progress); the model card is written by both tools, as by default
        return ["-m", "mergekit.scripts.run_yaml", str(config), str(out), "--no-copy-tokenizer", "--quiet",
                *(["--num-threads", str(threads)] if threads else []), *self.args]

    def parameters(self, env: dict[str, str]) -> dict[str, Any]:
        """The running mergekit's version and each method's parameters (required or not)."""
        from .mergekit_recipe import PARAMETER_NAMES_SCRIPT

        r = subprocess.run([sys.executable, "-c", PARAMETER_NAMES_SCRIPT], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            where = f"from {self.path}" if self.path else "in this Python"
            raise RuntimeError(f"bench speed: mergekit does not import {where} ({last}); install it with "
                               "`pip install --target DIR mergekit==0.1.5` and pass --mergekit DIR")
        return json.loads(r.stdout.strip().splitlines()[-1])


def max_abs_difference(a: Path, b: Path) -> dict[str, Any]:
    """How two safetensors model folders differ, read with the safetensors library one tensor at a
    time (in float32): max |a − b| over every tensor, the tensor where it is largest, and the
    fraction of elements that differ at all; max inf and a note where the names or shapes differ."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    left, right = index(a), index(b)
    if set(left) != set(right):
        odd = sorted(set(left) ^ set(right))
        return {"max_abs_diff": float("inf"), "diff_note": f"tensor names differ ({len(odd)}: {', '.join(odd[:3])})"}
    worst, worst_name, differing, total = 0.0, None, 0, 0
    for name in sorted(left):
        with safe_open(str(left[name]), framework="pt") as h:
            x = h.get_tensor(name).float()
        with safe_open(str(right[name]), framework="pt") as h:
            y = h.get_tensor(name).float()
        if x.shape != y.shape:
            return {"max_abs_diff": float("inf"),
                    "diff_note": f"{name}: shape {tuple(x.shape)} against {tuple(y.shape)}"}
        if x.numel():
            d = (x - y).abs()
            differing += int((d > 0).sum())
            total += x.numel()
            if float(d.max()) > worst:
                worst, worst_name = float(d.max()), name
        del x, y
    return {"max_abs_diff": worst, "max_abs_diff_tensor": worst_name,
            "differing_fraction": differing / total if total else 0.0}


def _file_stem(spec: str) -> str:
    return spec.replace(':', '_').replace(',', '_').replace('=', '-')


def _fail_message(name: str, run: Run, log_path: Path) -> str:
    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
    return f"{name} failed (exit {run.returncode}):\n" + "\n".join(tail)


def run_speed(shape: Shape, cache: Path, methods: list[str], repeats: int = 3, threads: int | None = None,
              log=print, mergekit: Mergekit | None = None) -> dict[str, Any]:
    """Build (or reuse) the checkpoints, then time the floor and each method, `repeats` times each;
    with `mergekit`, each method that mergekit can express through mergekit too."""
    from .mergekit_recipe import to_mergekit

    folders = build_checkpoints(shape, cache, log)
    work = Path(tempfile.mkdtemp(prefix="modalmerge-bench-"))
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the children import this very modalmerge
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    if threads:  # both tools' children: the same thread count for torch and OpenMP
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    rows = {"floor": Row("floor"), OVERLAPPED: Row(OVERLAPPED)} | {m: Row(m) for m in methods}
    mk_env = mergekit.env(env) if mergekit else None
    mk_info = mergekit.parameters(mk_env) if mergekit else None
    mk_rows: dict[str, Row] = {}
    mk_notes: dict[str, dict[str, Any]] = {}
    inputs_of: dict[str, int] = {}   # fine-tunes merged by each row
    try:
        recipes, mk_configs = {}, {}
        for m in methods:
            path = work / f"{_file_stem(m)}.json"
            recipe = recipe_for(m, folders)
            path.write_text(json.dumps(recipe))   # JSON is YAML
            inputs_of[m] = len(recipe["models"])
            recipes[m] = path
            if mergekit:
                known = {k: dict(v) for k, v in mk_info["methods"].items()}
                mk, why = to_mergekit(recipe, known)
                if mk is None:
                    mk_notes[m] = {"none": why}
                else:
                    mk_configs[m] = work / f"mergekit-{_file_stem(m)}.yaml"
                    mk_configs[m].write_text(yaml_dump(mk))
                    mk_rows[m] = Row(f"mergekit {m}")
                    mk_notes[m] = {"recipe": mk}
        inputs = [str(folders["base"])] + [str(p) for n, p in folders.items() if n != "base"]
        thread_args = ["--threads", str(threads)] if threads else []
        out, mk_out = work / "out", work / "out-mergekit"
        for rep in range(repeats):
            for name, row in rows.items():
                shutil.rmtree(out, ignore_errors=True)
                if name in ("floor", OVERLAPPED):
                    cmd = ["-m", "modalmerge.bench.speed", name, str(out), *inputs]
                else:
                    cmd = ["-m", "modalmerge", "merge", str(recipes[name]), "--output", str(out),
                           "--no-progress", *thread_args]
                run = measure(cmd, work / "log.txt", env)
                if run.returncode != 0:
                    raise RuntimeError("bench speed: " + _fail_message(name, run, work / "log.txt"))
                row.runs.append(run)
                log(f"  [{rep + 1}/{repeats}] {name:<22} {run.seconds:7.2f} s  cpu {run.cpu_seconds:7.2f} s  "
                    f"{run.peak_rss / 1e9:5.2f} GB")
                if name in mk_rows and "failed" not in mk_notes[name]:
                    shutil.rmtree(mk_out, ignore_errors=True)
                    run = measure(mergekit.command(mk_configs[name], mk_out, threads), work / "log-mergekit.txt",
                                  mk_env)
                    if run.returncode != 0:   # reported in its row; the other rows still run
                        mk_notes[name]["failed"] = _fail_message("mergekit", run, work / "log-mergekit.txt")
                        log(f"  [{rep + 1}/{repeats}] mergekit {name}: " + mk_notes[name]["failed"])
                    else:
                        mk_rows[name].runs.append(run)
                        log(f"  [{rep + 1}/{repeats}] {'mergekit ' + name:<22} {run.seconds:7.2f} s  "
                            f"cpu {run.cpu_seconds:7.2f} s  {run.peak_rss / 1e9:5.2f} GB")
                        if "max_abs_diff" not in mk_notes[name]:   # the first repeat's outputs
                            mk_notes[name] |= max_abs_difference(out, mk_out)
                    shutil.rmtree(mk_out, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor_s, overlapped_s = rows["floor"].seconds, rows[OVERLAPPED].seconds
    results = []
    for name, row in rows.items():
        target = TARGETS.get(parse_method(name)[0].removesuffix(MERGEKIT_SUFFIX)) \
            if name not in ("floor", OVERLAPPED) else None
        result = {"name": name, "inputs": inputs_of.get(name, shape.models), "seconds": row.seconds,
                  "x_floor": row.seconds / floor_s,
                  "x_overlapped_floor": row.seconds / overlapped_s,
                  "cpu_seconds": row.cpu_seconds,
                  "peak_rss_bytes": row.peak_rss, "target_x_floor": target,
                  "runs": [asdict(r) for r in row.runs]}
        if name in mk_notes:
            note = dict(mk_notes[name])
            mk_row = mk_rows.get(name)
            if mk_row is not None and mk_row.runs and "failed" not in note:
                note |= {"seconds": mk_row.seconds, "cpu_seconds": mk_row.cpu_seconds,
                         "peak_rss_bytes": mk_row.peak_rss, "x_faster": mk_row.seconds / row.seconds,
                         "runs": [asdict(r) for r in mk_row.runs]}
            result["mergekit"] = note
        results.append(result)
    summary = {"shape": asdict(shape) | {"intermediate": shape.ffn, "parameters": shape.parameters},
               "repeats": repeats, "threads": threads, "python": sys.version.split()[0],
               "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               "results": results}
    if mergekit:
        summary["mergekit"] = {"version": mk_info.get("version"), "path": mergekit.path,
                               "command": ["python", *mergekit.command(Path("CONFIG"), Path("OUT"), threads)]}
    return summary


def yaml_dump(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table; with mergekit's columns when it ran, and a note under the
    table for each row it has no number for."""
    s = result["shape"]
    with_mk = "mergekit" in result
    head = "| run | wall (s) | × floor | × overlapped floor | target | CPU (s) | peak RSS (GB) |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if with_mk:
        head += " mergekit wall (s) | mergekit peak RSS (GB) | × faster | max \\|Δ\\| |"
        rule += "---:|---:|---:|---:|"
    lines = [f"{s['parameters'] / 1e6:.0f}M parameters (hidden {s['hidden']}, {s['layers']} layers, vocab "
             f"{s['vocab']}, intermediate {s['intermediate']}), bfloat16, base + {s['models']} models; "
             f"median of {result['repeats']}, threads {result['threads'] or 'all'}, {result['cpus']} CPUs"
             + (f"; mergekit {result['mergekit'].get('version') or '(version unknown)'}" if with_mk else ""),
             "", head, rule]
    notes = []
    for r in result["results"]:
        target = f"≤ {r['target_x_floor']}×" if r["target_x_floor"] else ""
        k = r.get("inputs", s["models"])   # fine-tunes this row merged, when fewer than the shape's
        name = r["name"] if k == s["models"] else f"{r['name']} ({k} model{'s' if k != 1 else ''})"
        line = (f"| {name} | {r['seconds']:.2f} | {r['x_floor']:.2f} | {r['x_overlapped_floor']:.2f} | "
                f"{target} | {r['cpu_seconds']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} |")
        if with_mk:
            mk = r.get("mergekit")
            if mk is None:        # a floor
                line += "  |  |  |  |"
            elif "seconds" in mk:
                line += (f" {mk['seconds']:.2f} | {mk['peak_rss_bytes'] / 1e9:.2f} | {mk['x_faster']:.1f} | "
                         f"{_difference(mk.get('max_abs_diff'))} |")
                if mk.get("diff_note"):
                    notes.append(f"- {r['name']}: the outputs differ in form: {mk['diff_note']}")
            else:
                line += " — | — | — | — |"
                why = mk.get("none") or mk.get("failed", "").replace("\n", " / ")
                notes.append(f"- {r['name']}: {'mergekit failed: ' if 'failed' in mk else 'no mergekit run: '}{why}")
        lines.append(line)
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def _difference(d: float | None) -> str:
    if d is None:
        return "—"
    return "0" if d == 0 else "inf" if d == float("inf") else f"{d:.1e}"


if __name__ == "__main__":   # a floor's child process: python -m modalmerge.bench.speed floor[:overlapped] OUT IN...
    if len(sys.argv) >= 4 and sys.argv[1] in ("floor", OVERLAPPED):
        floor(sys.argv[3:], sys.argv[2], overlap=sys.argv[1] == OVERLAPPED)
    else:
        sys.exit(f"usage: python -m modalmerge.bench.speed floor|{OVERLAPPED} OUTPUT INPUT...")
