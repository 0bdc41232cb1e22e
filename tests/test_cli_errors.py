"""The CLI's last line of defence: whatever goes wrong, one `error:` line and a non-zero exit,
never a traceback (unless --debug asks for it); empty tensors merge instead of crashing."""

import errno
import subprocess
import sys

import pytest
import torch

import modalmerge
from conftest import random_state_dict
from modalmerge import cli


def _failing(exc):
    def run(args):
        raise exc
    return run


@pytest.mark.parametrize("exc, expected", [
    (RuntimeError("boom\nsecond line"), "error: unexpected RuntimeError: boom second line; run with --debug"),
    (ModuleNotFoundError("No module named 'transformers'", name="transformers"),
     "error: this needs the optional package 'transformers': pip install 'modalmerge[hf]'"),
    (ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot"),
     "error: this needs the optional package 'matplotlib': pip install 'modalmerge[bench]'"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors"),
     "error: /out/model.safetensors: no space left on device; free space or choose another --output"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/out"),
     "error: /ro/out: read-only file system; the file system is read-only; choose another --output"),
    (MemoryError(), "error: out of memory;"),
])
def test_unexpected_exceptions_are_one_line(monkeypatch, capsys, exc, expected):
    monkeypatch.setattr(cli, "cmd_methods", _failing(exc))
    assert cli.main(["methods"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(expected)
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--debug", "methods"], ["methods", "--debug"]])
def test_debug_shows_the_traceback(monkeypatch, argv):
    monkeypatch.setattr(cli, "cmd_methods", _failing(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(argv)


def test_the_demo_names_the_bench_extra(monkeypatch, capsys):
    import modalmerge.commands.demo as demo

    monkeypatch.setattr(demo, "cmd_demo", _failing(ModuleNotFoundError("x", name="transformers")))
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err == "error: this needs the optional package 'transformers': pip install 'modalmerge[bench]'\n"


def test_debug_is_taken_by_nested_commands():
    args = cli.build_parser().parse_args(["bench", "speed", "--debug"])
    assert args.debug is True
    assert cli.build_parser().parse_args(["bench", "speed"]).debug is False


def test_unexpected_error_in_a_subprocess_has_no_traceback(tmp_path):
    """A real process: a recipe that is a folder gives one line (whatever layer catches it)."""
    out = subprocess.run([sys.executable, "-m", "modalmerge", "merge", str(tmp_path), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["neuromerging", "breadcrumbs", "della", "widen", "ties", "tall"])
def test_zero_size_tensors_are_copied_not_merged(method):
    base = dict(random_state_dict(0))
    base.update({"empty.rows": torch.zeros(0, 4), "empty.cols": torch.zeros(3, 0)})
    models = [{k: v + 0.01 * (i + 1) for k, v in base.items()} for i in range(2)]
    out = modalmerge.merge_state_dicts(method, models, base=base)
    assert out["empty.rows"].shape == (0, 4) and out["empty.cols"].shape == (3, 0)
    reference = modalmerge.merge_state_dicts(method, [{k: v for k, v in m.items() if not k.startswith("empty")}
                                                      for m in models],
                                             base={k: v for k, v in base.items() if not k.startswith("empty")})
    for name, tensor in reference.items():
        torch.testing.assert_close(out[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("fifo_name", ["config.json", "tokenizer.json", "trainer_state.json"])
def test_a_fifo_among_a_model_folders_files_is_refused_not_waited_on(tmp_path, capsys, fifo_name):
    """Files read beside the weights (the config, copied tokenizer files, a Trainer state) are
    checked to be regular files: reading a named pipe would block the merge forever."""
    import os

    import yaml
    from test_errors import fails
    from test_input_validation import no_hang
    from conftest import finetunes
    from modalmerge.checkpoint.safetensors_io import save_file

    base = random_state_dict(0)
    paths = {}
    for name, sd in (("base", base), ("a", finetunes(base, 1, seed=1)[0]), ("b", finetunes(base, 1, seed=2)[0])):
        paths[name] = tmp_path / name
        paths[name].mkdir()
        save_file(sd, paths[name] / "model.safetensors")
    os.mkfifo(paths["base"] / fifo_name)
    method = "metrics_weighted" if fifo_name == "trainer_state.json" else "ties"
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"method": method, "base": str(paths["base"]),
                                 "models": [str(paths["base"]) if method == "metrics_weighted" else str(paths["a"]),
                                            str(paths["b"])]}))
    out = tmp_path / "out"
    with no_hang(20):
        fails(capsys, ["merge", str(r), "--output", str(out)], out, fifo_name, "not a regular file")


@pytest.mark.parametrize("argv", [
    ["bench", "text", "--quick", "--data-dir", "{data}", "--out", "{data}/results"],
    ["bench", "moe", "--quick", "--data-dir", "{data}", "--out", "{data}"],
    ["bench", "mllm", "--tiny", "--data-dir", "{data}", "--out", "{data}/x/y"],
    ["bench", "text", "--quick", "--data-dir", "{data}", "--cache", "{tmp}"],
])
def test_a_benchmark_never_writes_into_its_data(tmp_path, capsys, argv):
    data = tmp_path / "data"
    (data / "sentconv").mkdir(parents=True)
    argv = [a.format(data=data, tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data folder" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in data.iterdir()) == ["sentconv"]


def test_a_benchmark_output_that_cannot_be_written_fails_before_the_run(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(["bench", "speed", "--quick", "--out", str(tmp_path / "file" / "speed.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "not a writable folder" in err, err
