"""Inputs are validated as strictly as the safetensors library validates them (issue 11, item 5).

Corrupt safetensors headers, shard indexes that leave the model folder, things that are not
regular files, bad OTA optimizer states and bad PEFT adapter configs: each is one MergeError
naming the file, never a traceback or a hang. The last tests fuzz the header reader with
hypothesis against `safetensors.safe_open` itself."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import struct
from pathlib import Path

import pytest
import safetensors
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import cli_fails, finetunes, random_state_dict
from modalmerge.checkpoint import safetensors_io
from modalmerge.checkpoint.safetensors_io import SafetensorsFile, save_file
from modalmerge.checkpoint.sources import open_source
from modalmerge.procedures.calibration import optimizer_second_moments
from modalmerge.errors import MergeError


# -- helpers ---------------------------------------------------------------------------------

@contextlib.contextmanager
def no_hang(seconds: float = 10):
    """Fail (instead of hanging the test run) if the body blocks, e.g. on a FIFO."""
    def alarm(*_):
        raise TimeoutError(f"blocked for more than {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def st_bytes(header, data: bytes = b"", pad: bool = True) -> bytes:
    """A safetensors file from a header (a dict, or raw JSON bytes) and a data area."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def library_refuses(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return False
    except Exception:
        return True


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


def save_model(folder: Path, sd: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    return folder


# -- corrupt safetensors headers ---------------------------------------------------------------

E8 = b"\0" * 8
E16 = b"\0" * 16
# (case, header, data, fragments the message must hold): every one is refused by safe_open too,
# except the duplicated names, which the library may keep silently (its JSON map keeps the last).
CORRUPT = [
    ("overlap", {"a": entry(offsets=(0, 8)), "b": entry(offsets=(0, 8))}, E8, ["'b'", "overlap"]),
    ("overlap-partial", {"a": entry(shape=(4,), offsets=(0, 16)), "b": entry(offsets=(8, 16))}, E16, ["overlap"]),
    ("gap", {"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}, b"\0" * 20, ["'b'", "4-byte gap"]),
    ("not-from-zero", {"a": entry(offsets=(4, 12))}, b"\0" * 12, ["'a'", "gap"]),
    ("end-before-begin", {"a": entry(offsets=(8, 0))}, E8, ["'a'", "do not match"]),
    ("past-end", {"a": entry(offsets=(0, 8)), "b": entry(offsets=(8, 16))}, E8, ["truncated"]),
    ("offsets-past-u64", {"a": entry(offsets=(0, 2 ** 64))}, E8, ["'a'", "data_offsets"]),
    ("trailing-bytes", {"a": entry()}, b"\0" * 9, ["1 bytes after the last tensor"]),
    ("dtype-shape-mismatch", {"a": entry(dtype="F16", shape=(2,), offsets=(0, 8))}, E8,
     ["'a'", "do not match its shape [2] and dtype F16"]),
    ("shape-too-big", {"a": entry(shape=(3,), offsets=(0, 8))}, E8, ["'a'", "do not match"]),
    ("negative-shape", {"a": entry(shape=(-2,))}, E8, ["'a'", "shape [-2]", "non-negative integers"]),
    ("float-shape", {"a": entry(shape=(2.0,))}, E8, ["'a'", "non-negative integers"]),
    ("bool-shape", {"a": entry(shape=(True, 2))}, E8, ["'a'", "non-negative integers"]),
    ("string-shape", {"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, E8, ["'a'", "shape"]),
    ("overflowing-shape", {"a": entry(shape=(2 ** 32, 2 ** 32))}, E8, ["'a'", "too large"]),
    ("partial-product-overflow", {"a": entry(shape=(2 ** 63, 2, 0), offsets=(0, 0))}, b"", ["too large"]),
    ("three-offsets", {"a": entry(offsets=(0, 8, 8))}, E8, ["'a'", "[begin, end]"]),
    ("float-offset", {"a": entry(offsets=(0, 8.0))}, E8, ["'a'", "[begin, end]"]),
    ("missing-offsets", {"a": {"dtype": "F32", "shape": [2]}}, E8, ["'a'", "data_offsets None"]),
    ("unknown-dtype", {"a": entry(dtype="F33")}, E8, ["'a'", "unknown dtype 'F33'"]),
    ("lowercase-dtype", {"a": entry(dtype="f32")}, E8, ["unknown dtype 'f32'"]),
    ("entry-not-object", {"a": [1, 2]}, b"", ["'a'", "not an object"]),
    ("header-a-list", b"[1, 2]", b"", ["not a JSON object"]),
    ("header-a-string", b'"hello"', b"", ["not a JSON object"]),
    ("header-not-json", b"{not json", b"", ["not JSON"]),
    ("header-nan", b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', E8, ["not JSON"]),
    ("header-utf16", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'.encode("utf-16"), E8, ["not JSON"]),
    ("header-lone-surrogate", b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', E8, ["not JSON"]),
    ("header-minus-zero", b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', b"", ["'a'", "shape"]),
    ("metadata-int-value", {"__metadata__": {"format": 1}, "a": entry()}, E8, ["__metadata__"]),
    ("metadata-a-list", {"__metadata__": ["pt"], "a": entry()}, E8, ["__metadata__"]),
    ("duplicate-field", b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', E8, ["'a'"]),
    ("duplicate-name-other-offsets",
     b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
     E16, ["'a' appears twice"]),
    ("duplicate-name-same-entry",
     b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
     E8, ["'a' appears twice"]),
    ("duplicate-name-escaped",
     b'{"\\u0061":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
     b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
     E16, ["'a' appears twice"]),
    ("duplicate-metadata-key",
     b'{"__metadata__":{"k":"1","k":"2"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
     E8, ["__metadata__"]),
]
LIBRARY_KEEPS = {"duplicate-name-same-entry", "duplicate-metadata-key"}  # stricter than safetensors on purpose


@pytest.mark.parametrize("case,header,data,fragments", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_header_is_one_line(tmp_path, case, header, data, fragments):
    folder = tmp_path / "model"
    folder.mkdir()
    f = folder / "model.safetensors"
    f.write_bytes(st_bytes(header, data))
    with pytest.raises(MergeError) as e:
        open_source(folder)
    msg = one_line(e)
    assert str(f) in msg and ("re-save" in msg or "re-download" in msg), msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    # the library refuses it as well (we are at least as strict), bar the duplicates it keeps
    assert library_refuses(f) == (case not in LIBRARY_KEEPS)


@pytest.mark.parametrize("raw", [b"", b"\x01" * 7, struct.pack("<Q", 2 ** 63) + b"{}",
                                 struct.pack("<Q", 100_000_001) + b"{}" + b" " * 100,
                                 struct.pack("<Q", 0), struct.pack("<Q", 10) + b"{}"])
def test_bad_length_prefix_is_one_line(tmp_path, raw):
    f = tmp_path / "x.safetensors"
    f.write_bytes(raw)
    with pytest.raises(MergeError) as e:
        open_source(f)
    assert str(f) in one_line(e)
    assert library_refuses(f)


def test_what_the_library_accepts_is_read_the_same(tmp_path):
    # tensors listed out of offset order, zero-size ones sharing an offset, null metadata,
    # unknown extra fields: all valid safetensors, and read exactly as safe_open reads them
    a, b = torch.arange(4, dtype=torch.float32), torch.tensor([7, -1], dtype=torch.int16)
    data = a.numpy().tobytes() + b.numpy().tobytes()
    header = {"__metadata__": None, "b": entry("I16", (2,), (16, 20)), "z0": entry("F32", (0, 3), (16, 16)),
              "a": {**entry("F32", (2, 2), (0, 16)), "extra": {"k": [1, 2]}}, "z1": entry("BF16", (0,), (20, 20))}
    f = tmp_path / "x.safetensors"
    f.write_bytes(st_bytes(header, data))
    src = open_source(f)
    assert sorted(src.names()) == ["a", "b", "z0", "z1"]
    with safetensors.safe_open(str(f), framework="pt") as lib:
        for n in lib.keys():
            assert torch.equal(src.read(n), lib.get_tensor(n)), n
            assert src.read(n).dtype == lib.get_tensor(n).dtype
    assert torch.equal(src.read("a"), a.reshape(2, 2))


def test_library_check_backs_up_our_own(tmp_path):
    # JSON nested deeper than the library's parser allows, in a field nobody reads: our parser
    # would take it, the library refuses it, so we refuse it (and say the library did)
    deep = b"[" * 200 + b"]" * 200
    f = tmp_path / "x.safetensors"
    f.write_bytes(st_bytes(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + deep + b"}}", E8))
    assert library_refuses(f)
    with pytest.raises(MergeError, match="the safetensors library refuses it") as e:
        SafetensorsFile(f)
    assert str(f) in one_line(e)


def test_overlapping_offsets_through_the_cli(tmp_path, capsys):
    base = random_state_dict(0)
    a, b = finetunes(base, 2)
    paths = {n: save_model(tmp_path / n, sd) for n, sd in (("base", base), ("a", a), ("b", b))}
    # b: the second tensor's offsets are made to point at the first tensor's bytes
    f = paths["b"] / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    first, second = header[names[0]], header[names[1]]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + second["data_offsets"][1]
                              - second["data_offsets"][0]]
    f.write_bytes(st_bytes(header, raw[8 + n:]))
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"method": "ties", "base": str(paths["base"]),
                                 "models": [{"path": str(paths["a"]), "name": "a"},
                                            {"path": str(paths["b"]), "name": "b"}]}))
    out = tmp_path / "out"
    cli_fails(capsys, ["merge", str(r), "-o", str(out), "--no-progress"], out, str(f), "overlap")
    # and a duplicated name in a
    f = paths["a"] / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    text = raw[8:8 + n].decode().rstrip()
    k0 = json.dumps(names[0])
    dup = text[:-1] + "," + k0 + ":" + json.dumps(json.loads(text)[names[0]]) + "}"
    f.write_bytes(st_bytes(dup.encode(), raw[8 + n:]))
    cli_fails(capsys, ["merge", str(r), "-o", str(out), "--no-progress"], out, str(f), "appears twice")


# -- shard indexes -----------------------------------------------------------------------------

def sharded(folder: Path, weight_map: dict | None = None, index_text: str | None = None) -> Path:
    """A two-shard model folder; `weight_map` or `index_text` replace the index's content."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"a": torch.ones(2)}, folder / "s1.safetensors")
    save_file({"b": torch.zeros(3)}, folder / "s2.safetensors")
    if index_text is None:
        index_text = json.dumps({"metadata": {}, "weight_map": weight_map or {"a": "s1.safetensors",
                                                                             "b": "s2.safetensors"}})
    (folder / "model.safetensors.index.json").write_text(index_text)
    return folder


def test_a_good_shard_index_is_read(tmp_path):
    src = open_source(sharded(tmp_path / "m"))
    assert sorted(src.names()) == ["a", "b"] and torch.equal(src.read("a"), torch.ones(2))


def test_shard_entry_with_dotdot_is_refused(tmp_path):
    save_file({"b": torch.zeros(3)}, tmp_path / "x.safetensors")  # it exists, and is valid
    folder = sharded(tmp_path / "m", {"a": "s1.safetensors", "b": "../x.safetensors"})
    with pytest.raises(MergeError) as e:
        open_source(folder)
    msg = one_line(e)
    assert "model.safetensors.index.json" in msg and "'../x.safetensors'" in msg and "outside the model folder" in msg


@pytest.mark.parametrize("target", ["/etc/passwd", "absolute-valid"])
def test_shard_entry_with_absolute_path_is_refused(tmp_path, target):
    if target == "absolute-valid":
        target = str(tmp_path / "x.safetensors")
        save_file({"b": torch.zeros(3)}, target)
    folder = sharded(tmp_path / "m", {"a": "s1.safetensors", "b": target})
    with pytest.raises(MergeError) as e:
        open_source(folder)
    assert "outside the model folder" in one_line(e) and target in str(e.value)


def test_shard_symlink_pointing_out_is_refused(tmp_path):
    save_file({"b": torch.zeros(3)}, tmp_path / "secret.safetensors")
    folder = sharded(tmp_path / "m")
    (folder / "s2.safetensors").unlink()
    (folder / "s2.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(MergeError) as e:
        open_source(folder)
    msg = one_line(e)
    assert "'s2.safetensors'" in msg and "outside the model folder" in msg and "secret.safetensors" in msg


def test_shard_symlinks_inside_the_folder_and_the_hub_cache_layout_are_fine(tmp_path):
    folder = sharded(tmp_path / "m")
    (folder / "sub").mkdir()
    (folder / "s2.safetensors").rename(folder / "sub" / "real.safetensors")
    (folder / "s2.safetensors").symlink_to(Path("sub") / "real.safetensors")
    assert torch.equal(open_source(folder).read("b"), torch.zeros(3))
    # huggingface_hub's cache: snapshots/<rev>/<file> are links to ../../blobs/<hash>
    repo = tmp_path / "models--org--name"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for name, value in (("s1.safetensors", {"a": torch.ones(2)}), ("s2.safetensors", {"b": torch.zeros(3)})):
        save_file(value, blobs / f"hash-{name}")
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / f"hash-{name}")
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                                   "b": "s2.safetensors"}}))
    assert sorted(open_source(snap).names()) == ["a", "b"]


@pytest.mark.parametrize("case,index_text,fragment", [
    ("not-json", "{weight_map: oops", "not valid JSON"),
    ("a-list", "[1, 2]", "weight_map"),
    ("no-weight-map", '{"metadata": {}}', "weight_map"),
    ("weight-map-a-list", '{"weight_map": ["s1.safetensors"]}', "weight_map"),
    ("shard-not-a-string", '{"weight_map": {"a": 1}}', "weight_map"),
    ("empty-shard-name", '{"weight_map": {"a": ""}}', "weight_map"),
    ("missing-shard", '{"weight_map": {"a": "s1.safetensors", "b": "s9.safetensors"}}', "'s9.safetensors' is missing"),
    ("tensor-not-in-its-shard", '{"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors"}}',
     "tensor 'a' is listed in s2.safetensors but is not in it"),
    ("not-utf8", "\udcff", "not valid JSON"),
])
def test_malformed_index_is_one_line(tmp_path, case, index_text, fragment):
    folder = tmp_path / "m"
    if case == "not-utf8":
        sharded(folder)
        (folder / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xff": "s1.safetensors"}}')
    else:
        sharded(folder, index_text=index_text)
    with pytest.raises(MergeError) as e:
        open_source(folder)
    msg = one_line(e)
    assert "model.safetensors.index.json" in msg and fragment in msg, msg


def test_index_traversal_through_the_cli(tmp_path, capsys):
    save_file({"b": torch.zeros(3)}, tmp_path / "x.safetensors")
    good = sharded(tmp_path / "good")
    bad = sharded(tmp_path / "bad", {"a": "s1.safetensors", "b": "../x.safetensors"})
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"method": "linear", "models": [str(good), str(bad)]}))
    out = tmp_path / "out"
    cli_fails(capsys, ["merge", str(r), "-o", str(out), "--no-progress"], out, "../x.safetensors", "outside")


# -- not regular files ---------------------------------------------------------------------------

def test_fifo_as_model_file_does_not_hang(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    with no_hang(), pytest.raises(MergeError) as e:
        open_source(fifo)
    assert str(fifo) in one_line(e) and "named pipe" in str(e.value)
    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    with no_hang(), pytest.raises(MergeError) as e:
        open_source(folder)
    assert "model.safetensors is a named pipe, not a regular file" in one_line(e)


def test_fifo_swapped_in_after_the_check_does_not_hang(tmp_path, monkeypatch):
    # the stat check passed for a regular file, then a FIFO took its place: the non-blocking open
    # and the check of the descriptor still refuse it at once
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    monkeypatch.setattr(safetensors_io, "check_regular", lambda *a, **k: None)
    with no_hang(), pytest.raises(MergeError, match="named pipe") as e:
        SafetensorsFile(fifo)
    one_line(e)


@pytest.fixture
def sock(tmp_path):
    """A listening unix socket in tmp_path (None where the path is too long for one)."""
    s = socket.socket(socket.AF_UNIX)
    path = tmp_path / "s.sock"
    try:
        s.bind(str(path))
    except OSError:
        path = None
    yield path
    s.close()


def test_device_or_socket_given_as_the_model_is_refused(tmp_path, sock):
    for target, kind in [("/dev/zero", "character device")] + ([(sock, "socket")] if sock else []):
        with no_hang(), pytest.raises(MergeError) as e:
            open_source(target)
        assert str(target) in one_line(e) and kind in str(e.value), str(e.value)


# (a shard that links to /dev/zero or a socket outside the folder is refused as leaving the folder)
@pytest.mark.parametrize("where,kind", [("model.safetensors", "folder"), ("model.safetensors", "named pipe"),
                                        ("model.safetensors", "character device"), ("model.safetensors", "socket"),
                                        ("shard", "folder"), ("shard", "named pipe")])
def test_model_file_that_is_not_a_regular_file_is_refused(tmp_path, sock, kind, where):
    folder = tmp_path / "m"
    folder.mkdir()
    f = folder / ("model.safetensors" if where == "model.safetensors" else "s2.safetensors")
    if where == "shard":
        save_file({"a": torch.ones(2)}, folder / "s1.safetensors")
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    if kind == "folder":
        f.mkdir()
    elif kind == "named pipe":
        os.mkfifo(f)
    elif kind == "character device":
        f.symlink_to("/dev/zero")
    else:
        if sock is None:
            pytest.skip("tmp_path is too long for a unix socket")
        f.symlink_to(sock)
    with no_hang(), pytest.raises(MergeError) as e:
        open_source(folder)
    msg = one_line(e)
    assert str(f) in msg and f"is a {kind}, not a regular file" in msg, msg


def test_fifo_as_index_or_adapter_config_or_bin_does_not_hang(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors.index.json")
    with no_hang(), pytest.raises(MergeError, match="named pipe") as e:
        open_source(folder)
    one_line(e)
    base = tmp_path / "base"
    save_model(base, {"w": torch.ones(2, 2)})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    os.mkfifo(adapter / "adapter_config.json")
    with no_hang(), pytest.raises(MergeError, match="named pipe") as e:
        open_source(adapter, base=open_source(base))
    one_line(e)
    pt = tmp_path / "pt"
    pt.mkdir()
    os.mkfifo(pt / "pytorch_model.bin")
    with no_hang(), pytest.raises(MergeError, match="named pipe") as e:
        open_source(pt, allow_pickle=True)
    one_line(e)


def test_fifo_model_through_the_cli(tmp_path, capsys):
    good = save_model(tmp_path / "good", {"w": torch.ones(2, 2)})
    bad = tmp_path / "bad"
    bad.mkdir()
    os.mkfifo(bad / "model.safetensors")
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"method": "linear", "models": [str(good), str(bad)]}))
    out = tmp_path / "out"
    with no_hang(30):
        cli_fails(capsys, ["merge", str(r), "-o", str(out), "--no-progress"], out, "named pipe")


# -- OTA optimizer states ------------------------------------------------------------------------

NAMES = ["w", "b"]


def _moments(tmp_path: Path, obj, name="opt.pt") -> Path:
    p = tmp_path / name
    torch.save(obj, p)
    return p


def test_optimizer_state_good_forms(tmp_path):
    va, vb = torch.rand(2, 2), torch.rand(2)
    by_index = _moments(tmp_path, {"state": {0: {"exp_avg_sq": va}, 1: {"exp_avg_sq": vb}},
                                   "param_groups": [{"params": [0, 1]}]})
    got = optimizer_second_moments(str(by_index), "m", NAMES, True)
    assert torch.equal(got["w"], va) and torch.equal(got["b"], vb)
    # param_names (saved by optimizers built from named parameters) say which is which,
    # even when some parameter has no state
    named = _moments(tmp_path, {"state": {1: {"exp_avg_sq": vb}},
                                "param_groups": [{"params": [0, 1], "param_names": ["w", "b"]}]}, "named.pt")
    assert set(optimizer_second_moments(str(named), "m", NAMES, True)) == {"b"}
    save_file({"w": va, "b": vb}, tmp_path / "v.safetensors")
    got = optimizer_second_moments(str(tmp_path / "v.safetensors"), "m", NAMES, False)
    assert torch.equal(got["w"], va)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


@pytest.mark.parametrize("case,content,allow,fragment", [
    ("pickle-without-allow", "good", False, "pass --allow-pickle"),
    ("corrupt", b"\x80\x04 this is not a pickle", True, "cannot be loaded"),
    ("random-bytes", bytes(range(256)) * 4, True, "cannot be loaded"),
    ("empty", b"", True, "cannot be loaded"),
    ("code-in-pickle", "evil", True, "cannot be loaded with weights_only"),
    ("not-a-dict", [torch.ones(2)], True, "not a torch optimizer state dict"),
    ("state-a-list", {"state": [1, 2], "param_groups": []}, True, "not a torch optimizer state dict"),
    ("groups-not-dicts", {"state": {}, "param_groups": [1]}, True, "not a torch optimizer state dict"),
    ("index-past-the-names", {"state": {5: {"exp_avg_sq": torch.ones(2)}}, "param_groups": []}, True,
     "cannot tell which parameter its state 5"),
    ("fewer-states-than-tensors", {"state": {0: {"exp_avg_sq": torch.ones(2)}}, "param_groups": [{"params": [0]}]},
     True, "has 1 parameter states, the model 2 tensors"),
    ("exp-avg-sq-not-a-tensor", {"state": {"w": {"exp_avg_sq": "big"}}, "param_groups": []}, True,
     "exp_avg_sq of 'w' is not a floating-point tensor"),
    ("corrupt-safetensors", "corrupt-st", False, "not JSON"),
    ("fifo", "fifo", True, "named pipe"),
    ("missing", "missing", True, "does not exist"),
])
def test_bad_optimizer_state_is_one_line(tmp_path, case, content, allow, fragment):
    p = tmp_path / ("opt.safetensors" if content == "corrupt-st" else "opt.pt")
    if content == "good":
        torch.save({"state": {}, "param_groups": []}, p)
    elif content == "evil":
        p.write_bytes(pickle.dumps({"state": Evil()}))
    elif content == "corrupt-st":
        p.write_bytes(struct.pack("<Q", 4) + b"{no}")
    elif content == "fifo":
        os.mkfifo(p)
    elif content == "missing":
        pass
    elif isinstance(content, bytes):
        p.write_bytes(content)
    else:
        torch.save(content, p)
    with no_hang(), pytest.raises(MergeError) as e:
        optimizer_second_moments(str(p), "m", NAMES, allow)
    msg = one_line(e)
    assert "'m'" in msg or str(p) in msg
    assert str(p) in msg and fragment in msg, msg


def test_ota_with_a_corrupt_pickled_state_through_the_cli(tmp_path, capsys):
    base = random_state_dict(0)
    a, b = finetunes(base, 2)
    paths = {n: save_model(tmp_path / n, sd) for n, sd in (("base", base), ("a", a), ("b", b))}
    save_file({k: torch.rand(v.shape) for k, v in base.items()}, tmp_path / "va.safetensors")
    (tmp_path / "vb.pt").write_bytes(b"garbage, not a pickle")
    r = tmp_path / "r.yaml"
    models = [{"path": str(paths["a"]), "optimizer_state": str(tmp_path / "va.safetensors")},
              {"path": str(paths["b"]), "optimizer_state": str(tmp_path / "vb.pt")}]
    r.write_text(yaml.safe_dump({"method": "ota", "base": str(paths["base"]), "models": models}))
    out = tmp_path / "out"
    cli_fails(capsys, ["merge", str(r), "-o", str(out), "--no-progress"], out, "pickled optimizer state",
              "--allow-pickle")
    cli_fails(capsys, ["merge", str(r), "-o", str(out), "--no-progress", "--allow-pickle"], out,
              str(tmp_path / "vb.pt"), "cannot be loaded")
    # a pickle whose keys are not the model's tensors
    torch.save({"state": {"nope": {"exp_avg_sq": torch.ones(2)}}, "param_groups": []}, tmp_path / "vb.pt")
    cli_fails(capsys, ["merge", str(r), "-o", str(out), "--no-progress", "--allow-pickle"], out,
              "has no entry for tensor")


# -- PEFT adapter configs ------------------------------------------------------------------------

def lora_pair(tmp_path: Path, cfg: dict | None = None, cfg_text: str | None = None):
    """A base with one 4x4 weight and a rank-2 LoRA adapter for it (no peft needed)."""
    base = save_model(tmp_path / "base", {"layer.weight": torch.eye(4)})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g)
    save_file({"base_model.model.layer.lora_A.weight": A, "base_model.model.layer.lora_B.weight": B},
              adapter / "adapter_model.safetensors")
    if cfg_text is None:
        cfg_text = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **(cfg or {})})
    (adapter / "adapter_config.json").write_text(cfg_text)
    return base, adapter, A, B


def test_a_good_adapter_config_is_read(tmp_path):
    base, adapter, A, B = lora_pair(tmp_path)
    src = open_source(adapter, base=open_source(base))
    torch.testing.assert_close(src.read("layer.weight"), torch.eye(4) + B @ A * 2)


@pytest.mark.parametrize("case,cfg,text,fragment", [
    ("not-json", None, "{r: 2", "not valid JSON"),
    ("a-list", None, "[1]", "not a JSON object"),
    ("not-utf8", None, "\udcff", "not valid JSON"),
    ("missing-r", {"r": None}, None, "no `r`"),
    ("missing-alpha", {"lora_alpha": None}, None, "no `lora_alpha`"),
    ("alpha-a-string", {"lora_alpha": "16"}, None, "`lora_alpha` is '16', not a number"),
    ("alpha-a-bool", {"lora_alpha": True}, None, "`lora_alpha`"),
    ("r-zero", {"r": 0}, None, "`r` is 0, not a positive integer"),
    ("r-a-float", {"r": 2.5}, None, "`r`"),
    ("rslora-a-string", {"use_rslora": "yes"}, None, "`use_rslora`"),
    ("fan-in-fan-out-a-number", {"fan_in_fan_out": 1.5}, None, "`fan_in_fan_out`"),
    ("alpha-pattern-a-list", {"alpha_pattern": ["layer"]}, None, "`alpha_pattern`"),
    ("alpha-pattern-string-value", {"alpha_pattern": {"layer": "x"}}, None, "`alpha_pattern`"),
    ("alpha-pattern-bad-regex", {"alpha_pattern": {"lay(er": 3}}, None, "not a valid pattern"),
    ("rank-pattern-float", {"rank_pattern": {"layer": 2.0}}, None, "`rank_pattern`"),
    ("peft-type-a-number", {"peft_type": 3}, None, "`peft_type`"),
])
def test_malformed_adapter_config_is_one_line(tmp_path, case, cfg, text, fragment):
    if case == "not-utf8":
        base, adapter, _, _ = lora_pair(tmp_path)
        (adapter / "adapter_config.json").write_bytes(b'{"r": 2, "lora_alpha": 4, "\xff": 1}')
    else:
        if cfg is not None and None in cfg.values():  # a missing field
            full = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
            text = json.dumps({k: v for k, v in full.items() if k not in cfg})
        base, adapter, _, _ = lora_pair(tmp_path, cfg, text)
    with pytest.raises(MergeError) as e:
        open_source(adapter, base=open_source(base))
    msg = one_line(e)
    assert "adapter_config.json" in msg and fragment in msg, msg


def test_malformed_adapter_config_through_the_cli(tmp_path, capsys):
    base, adapter, _, _ = lora_pair(tmp_path, {"lora_alpha": "sixteen"})
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(base), "models": [str(adapter)]}))
    out = tmp_path / "out"
    cli_fails(capsys, ["merge", str(r), "-o", str(out), "--no-progress"], out, "adapter_config.json", "lora_alpha")
    # an adapter whose config names no usable base, given without one: still one line
    (adapter / "adapter_config.json").write_text("[]")
    r.write_text(yaml.safe_dump({"method": "linear", "models": [str(adapter), str(base)]}))
    cli_fails(capsys, ["merge", str(r), "-o", str(out), "--no-progress"], out)


# -- fuzzing: the header reader against safe_open ----------------------------------------------

# Valid files that the library accepts and we refuse on purpose: a repeated name or field
# (json keeps the last silently), a dtype torch has no type for here, and the library's odd
# acceptance of a dtype written as a one-key map ({"F32": null}).
STRICTER = ("appears twice", "not an object with unique fields", "__metadata__ must map unique",
            "is not supported by modalmerge", "unknown dtype {")


def _verdicts(path: Path, own_only: bool, monkeypatch=None):
    """(library's tensors or None, our tensors or our MergeError message)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            lib = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        lib = None
    check = safetensors_io._library_check
    if own_only:  # our checks alone, without the library's parse behind them
        safetensors_io._library_check = lambda *a: None
    try:
        sf = SafetensorsFile(path)
        ours = {k: sf.read(k) for k in sf.names()}
        sf.close()
    except MergeError as e:
        ours = str(e)
        assert "\n" not in ours
    finally:
        safetensors_io._library_check = check
    return lib, ours


def _agree(lib, ours) -> None:
    if lib is None:  # the library refuses: so do we
        assert isinstance(ours, str), "the safetensors library refuses this file, we accepted it"
        event("both refuse")
        return
    if isinstance(ours, str):
        assert any(s in ours for s in STRICTER), f"the library accepts this file, we refused it: {ours}"
        event("we are stricter on purpose")
        return
    event(f"both accept ({'no tensors' if not lib else 'tensors'})")
    assert set(lib) == set(ours)
    for k, v in lib.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        a, b = ours[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
        if v.dtype == torch.bool:  # any non-zero byte is True; we normalise it to 1 on reading
            a, b = a != 0, b != 0
        assert torch.equal(a, b), k


def _valid_file(tensors: list[tuple[str, str, list[int]]], metadata, order) -> bytes:
    header, data, pos = {}, b"", 0
    for name, dtype, shape in tensors:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * safetensors_io._FORMAT_BITS[dtype] // 8
        header[name] = entry(dtype, shape, (pos, pos + nbytes))
        data += bytes((pos + i) * 37 % 251 for i in range(nbytes))
        pos += nbytes
    items = list(header.items())
    items = [items[i] for i in order(len(items))]
    full = dict(items) if metadata is None else {"__metadata__": metadata, **dict(items)}
    return st_bytes(full, data)


DTYPES_OK = ["F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F64"]
names = st.text(st.characters(codec="utf-8"), max_size=6)
tensors = st.lists(st.tuples(names, st.sampled_from(DTYPES_OK), st.lists(st.integers(0, 4), max_size=3)),
                   max_size=4, unique_by=lambda t: t[0])
metadata = st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
FUZZ = settings(max_examples=1200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(tensors=tensors, metadata=metadata, perm=st.randoms(use_true_random=False),
       mutations=st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]),
                                    st.integers(0, 10 ** 6), st.integers(0, 255)), max_size=3),
       own_only=st.booleans())
def test_fuzz_mutated_valid_files(tmp_path, tensors, metadata, perm, mutations, own_only):
    raw = bytearray(_valid_file(tensors, metadata, lambda n: perm.sample(range(n), n)))
    for op, at, byte in mutations:
        n = struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0
        # mostly inside the header, where the structure lives
        i = at % max(min(len(raw), 8 + n) if at % 4 else len(raw), 1)
        if op == "flip" and raw:
            raw[i % len(raw)] ^= 1 << (byte % 8)
        elif op == "set" and raw:
            raw[i % len(raw)] = byte
        elif op == "insert":
            raw.insert(i, byte)
        elif op == "delete" and raw:
            del raw[i % len(raw)]
        elif op == "truncate":
            del raw[i:]
        elif op == "append":
            raw += bytes([byte]) * (1 + at % 9)
    f = tmp_path / "f.safetensors"
    f.write_bytes(bytes(raw))
    with no_hang():
        _agree(*_verdicts(f, own_only))


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 65, 2 ** 65), st.floats(allow_nan=False),
                      st.text(max_size=4))
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                                      max_size=3), max_leaves=8)
some_dtype = st.sampled_from(list(safetensors_io._FORMAT_BITS))
small = st.integers(0, 5)
odd_int = st.one_of(st.integers(-3, 2 ** 64 + 2), st.floats(0, 40), st.booleans(), json_any)


def mostly(good, bad, draw):
    """`good` nine times in ten: well-formed enough that the checks after the type checks run."""
    return draw(good) if draw(st.integers(0, 9)) else draw(bad)


@st.composite
def entry_st(draw):
    if not draw(st.integers(0, 9)):
        return draw(json_any)
    out = {"dtype": mostly(some_dtype, st.one_of(st.sampled_from(["F33", "f32", ""]), json_any), draw),
           "shape": mostly(st.lists(small, max_size=3), st.one_of(st.lists(st.one_of(small, odd_int), max_size=3),
                                                                  json_any), draw),
           "data_offsets": mostly(st.lists(small, min_size=2, max_size=2),
                                  st.one_of(st.lists(st.one_of(small, odd_int), max_size=3), json_any), draw)}
    if draw(st.integers(0, 9)) == 0:
        out["extra"] = draw(json_any)
    return out


@settings(FUZZ, max_examples=800)
@given(header=st.dictionaries(names, entry_st(), max_size=3),
       meta=st.one_of(st.just("absent"), st.none(), st.dictionaries(st.text(max_size=3), st.text(max_size=3)),
                      json_any),
       contiguous=st.booleans(), slack=st.one_of(st.just(0), st.just(0), st.integers(-2, 2)), own_only=st.booleans())
def test_fuzz_random_header_structures(tmp_path, header, meta, contiguous, slack, own_only):
    if meta != "absent":
        header = {"__metadata__": meta, **header}
    size = 0
    if contiguous:  # give well-formed entries consistent offsets, so that deeper checks are reached
        for v in header.values():
            if isinstance(v, dict) and isinstance(v.get("shape"), list) and isinstance(v.get("dtype"), str) \
                    and v["dtype"] in safetensors_io._FORMAT_BITS \
                    and all(type(s) is int and 0 <= s < 50 for s in v["shape"]):
                n = 1
                for s in v["shape"]:
                    n *= s
                nbytes = n * safetensors_io._FORMAT_BITS[v["dtype"]] // 8
                v["data_offsets"] = [size, size + nbytes]
                size += nbytes
    else:
        ends = [o[1] for v in header.values() if isinstance(v, dict) for o in [v.get("data_offsets")]
                if isinstance(o, list) and len(o) == 2 and type(o[1]) is int and 0 <= o[1] < 10 ** 5]
        size = max(ends, default=0)
    f = tmp_path / "f.safetensors"
    f.write_bytes(st_bytes(header, bytes(max(0, size + slack))))
    with no_hang():
        _agree(*_verdicts(f, own_only))


@settings(FUZZ, max_examples=500)
@given(raw=st.binary(max_size=64), header_len=st.one_of(st.none(), st.integers(0, 80)))
def test_fuzz_random_bytes(tmp_path, raw, header_len):
    if header_len is not None:
        raw = struct.pack("<Q", header_len) + raw
    f = tmp_path / "f.safetensors"
    f.write_bytes(raw)
    with no_hang():
        _agree(*_verdicts(f, own_only=False))


def test_shard_symlink_loop_and_decoupled_index_traversal(tmp_path):
    folder = sharded(tmp_path / "m")
    (folder / "s2.safetensors").unlink()
    (folder / "s2.safetensors").symlink_to(folder / "s2.safetensors")
    with pytest.raises(MergeError, match="symlink loop") as e:
        open_source(folder)
    one_line(e)
    # a decoupled merge's own shard index (read by `extract`) is held to the same rule
    from modalmerge.checkpoint.decoupled import _stem_files

    d = tmp_path / "decoupled"
    d.mkdir()
    (d / "shared_sparse.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../m/s1.safetensors"}}))
    with pytest.raises(MergeError, match="outside the model folder") as e:
        _stem_files(d, "shared_sparse")
    assert "re-run the merge" in one_line(e)


def test_validation_reads_only_the_header(tmp_path):
    # a 4 GiB (sparse) shard opens at once: neither our checks nor the library's touch the data
    import time

    n = 1 << 30
    f = tmp_path / "big.safetensors"
    raw = st_bytes({"w": entry("F32", (n,), (0, 4 * n))})
    with open(f, "wb") as fh:
        fh.write(raw)
        fh.truncate(len(raw) + 4 * n)
    t = time.perf_counter()
    sf = SafetensorsFile(f)
    assert time.perf_counter() - t < 2.0
    assert sf.meta("w").numel == n and torch.equal(sf.read("w", 5, 9), torch.zeros(4))
    sf.close()
