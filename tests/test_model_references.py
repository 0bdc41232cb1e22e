"""Model references as mergekit 0.1.5 takes them (mergekit/common.py ModelReference, ModelPath):
`model+lora`, the mapping {model: {path}, lora: {path}}, and Hugging Face hub ids resolved from a
cache laid out the way the hub lays it out (nothing is downloaded here)."""

import json
import os
import sys

import pytest
import torch
import yaml

peft = pytest.importorskip("peft")

from conftest import cli_fails, load_sd, perturbed, tiny_llama  # noqa: E402
from modalmerge.checkpoint.sources import PeftSource, open_source  # noqa: E402
from modalmerge.cli import main  # noqa: E402
from modalmerge.engine.recipe import parse_recipe  # noqa: E402
from modalmerge.errors import MergeError  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base, a PEFT LoRA adapter trained on it (B made non-zero), a full fine-tune, and
    peft's own merge of the adapter."""
    root = tmp_path_factory.mktemp("refs")
    base = tiny_llama(0)
    base.save_pretrained(root / "base")
    perturbed(base, seed=5).save_pretrained(root / "ft")
    lora = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    lora.save_pretrained(root / "adapter")
    merged = {k: v.detach().clone() for k, v in lora.merge_and_unload().state_dict().items()}
    return {"root": root, "base": root / "base", "ft": root / "ft", "adapter": root / "adapter", "merged": merged}


def merge(tmp_path, data, name="out") -> dict:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / name
    assert main(["merge", str(recipe), "-o", str(out), "--no-progress"]) == 0
    return load_sd(out)


def assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)


def test_shorthand_reads_base_plus_adapter(models):
    src = open_source(f"{models['base']}+{models['adapter']}", label="m")
    assert isinstance(src, PeftSource) and src.folder == models["base"]  # config/tokenizer from the base
    for name in src.names():
        torch.testing.assert_close(src.read(name), models["merged"][name], atol=1e-5, rtol=0, msg=name)


def test_shorthand_and_dict_form_equal_the_adapter_folder(models, tmp_path):
    base, adapter, ft = str(models["base"]), str(models["adapter"]), str(models["ft"])
    native = merge(tmp_path, {"method": "task_arithmetic", "base": base, "params": {"lambda": 0.5},
                              "models": [{"path": adapter, "name": "lora"}, {"path": ft, "name": "ft"}]}, "native")
    short = merge(tmp_path, {"method": "task_arithmetic", "base": base, "params": {"lambda": 0.5},
                             "models": [{"path": f"{base}+{adapter}", "name": "lora"}, {"path": ft, "name": "ft"}]},
                  "short")
    assert_same(short, native)
    for i, ref in enumerate([adapter, f"{base}+{adapter}", {"model": {"path": base}, "lora": {"path": adapter}},
                             {"model": base, "lora": adapter}]):
        mk = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": base,
                              "parameters": {"weight": 0.5},
                              "models": [{"model": ref}, {"model": ft}]}, f"mk{i}")
        assert_same(mk, native)


def test_mergekit_base_model_as_shorthand(models, tmp_path):
    # the base itself is base+adapter: the fine-tune's task vector is taken from the adapted base,
    # and the config files come from the model before '+'
    base, adapter, ft = str(models["base"]), str(models["adapter"]), str(models["ft"])
    for i, ref in enumerate([f"{base}+{adapter}", {"model": {"path": base}, "lora": {"path": adapter}}]):
        out = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": ref, "models": [{"model": ft}]},
                    f"b{i}")
        assert (tmp_path / f"b{i}" / "config.json").exists()
        ft_sd = load_sd(models["ft"])
        for name, value in out.items():
            torch.testing.assert_close(value, ft_sd[name], atol=1e-5, rtol=0, msg=name)


def test_relative_shorthand_in_a_recipe_file(models, tmp_path):
    root = models["root"]
    recipe = root / "rel.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "base+adapter"},
                                                                          {"model": "ft"}]}))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "-o", str(out), "--no-progress"]) == 0
    ft_sd, result = load_sd(models["ft"]), load_sd(out)
    for name, value in result.items():
        torch.testing.assert_close(value, (models["merged"][name] + ft_sd[name]) / 2, atol=1e-5, rtol=0, msg=name)


def test_bad_references_are_one_line(models, tmp_path, capsys):
    base, adapter, ft = str(models["base"]), str(models["adapter"]), str(models["ft"])
    cases = [
        (f"{base}+{adapter}+{adapter}", "one '+'"),
        (f"{base}+{ft}", "is not a PEFT LoRA adapter folder"),
        ({"model": {"path": base}, "override_architecture": "X"}, "override_architecture` is not supported"),
        ({"model": {"path": base}, "lora": {"path": adapter}, "extra": 1}, "must be a model path or hub id"),
        ({"lora": {"path": adapter}}, "has no `model`"),
        ({"path": base}, "unknown field 'path'"),  # mergekit's form is {model: {path: X}}
        (f"{base}@main", "which has no revision"),
    ]
    for i, (ref, fragment) in enumerate(cases):
        recipe = tmp_path / f"bad{i}.yaml"
        recipe.write_text(yaml.safe_dump({"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": ref}, {"model": ft}]}))
        cli_fails(capsys, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"], tmp_path / "out",
                  fragment)


def lay_out_cache(cache, repo_id: str, source_folder) -> str:
    """The hub cache's layout: blobs, snapshots/<commit>/ of links into them, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in sorted(source_folder.iterdir()):
        blob = repo / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return str(snap)


@pytest.fixture
def hub_cache(models, tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    snap = lay_out_cache(cache, "org/tiny-base", models["base"])
    lay_out_cache(cache, "org/tiny-lora", models["adapter"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"cache": cache, "snapshot": snap}


def test_hub_id_from_the_cache(models, hub_cache, tmp_path):
    base, ft = str(models["base"]), str(models["ft"])
    local = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": base, "parameters": {"weight": 0.7},
                             "models": [{"model": ft}]}, "local")
    for i, ref in enumerate(["org/tiny-base", "org/tiny-base@main", f"org/tiny-base@{COMMIT}",
                             {"model": {"path": "org/tiny-base", "revision": "main"}}]):
        hub = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": ref, "parameters": {"weight": 0.7},
                               "models": [{"model": ft}]}, f"hub{i}")
        assert_same(hub, local)
        assert (tmp_path / f"hub{i}" / "config.json").exists()  # copied from the snapshot folder
    src = open_source("org/tiny-base", label="b")
    assert str(src.path) == hub_cache["snapshot"]


def test_hub_model_plus_hub_adapter(models, hub_cache, tmp_path):
    ft = str(models["ft"])
    native = merge(tmp_path, {"method": "linear", "models": [f"{models['base']}+{models['adapter']}", ft]}, "n")
    for i, ref in enumerate(["org/tiny-base+org/tiny-lora",
                             {"model": {"path": "org/tiny-base"}, "lora": {"path": "org/tiny-lora", "revision": "main"}}]):
        hub = merge(tmp_path, {"merge_method": "linear", "models": [{"model": ref}, {"model": ft}]}, f"h{i}")
        assert_same(hub, native)


def test_native_recipe_hub_id_is_kept_relative_to_nothing(models, hub_cache, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "linear", "models": ["org/tiny-base", str(models["ft"])]}))
    from modalmerge.engine.recipe import load_recipe
    assert load_recipe(recipe).models[0].path == "org/tiny-base"


def test_output_inside_a_resolved_hub_folder_is_refused(models, hub_cache, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": "org/tiny-base"},
                                                                          {"model": str(models["ft"])}]}))
    out = tmp_path / "hub-cache" / "models--org--tiny-base" / "snapshots" / COMMIT / "out"
    cli_fails(capsys, ["merge", str(recipe), "-o", str(out), "--no-progress"], out, "lies inside", COMMIT)


def test_hub_id_missing_offline(models, hub_cache, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": "org/not-cached"},
                                                                          {"model": str(models["ft"])}]}))
    out = tmp_path / "out"
    cli_fails(capsys, ["merge", str(recipe), "-o", str(out), "--no-progress"], out, "org/not-cached",
              f"not in the cache at {hub_cache['cache']}", "download it", "unset HF_HUB_OFFLINE")


def test_missing_huggingface_hub_names_the_extra(models, hub_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` fails
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [{"model": "org/tiny-base"},
                                                                          {"model": str(models["ft"])}]}))
    cli_fails(capsys, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"], tmp_path / "out",
              "pip install 'modalmerge[hf]'")


def test_download_asks_only_for_the_files_a_merge_reads(models, hub_cache, monkeypatch):
    # online, snapshot_download is called (here replaced: tests never reach the network)
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return hub_cache["snapshot"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    open_source("org/tiny-base@v1", label="b")
    open_source("org/tiny-base", label="b", allow_pickle=True)
    (repo, first), (_, second) = calls
    assert repo == "org/tiny-base" and first["revision"] == "v1" and first["local_files_only"] is False
    assert first["cache_dir"] == str(hub_cache["cache"])
    assert "*.safetensors" in first["allow_patterns"] and "*.json" in first["allow_patterns"]
    assert not any(p.endswith(".bin") for p in first["allow_patterns"])
    assert "*.bin" in second["allow_patterns"]


def test_plain_missing_paths_still_say_does_not_exist(tmp_path):
    with pytest.raises(MergeError, match="does not exist"):
        open_source(tmp_path / "nowhere", label="m")
    with pytest.raises(MergeError, match="does not exist"):
        open_source("nowhere-at-all", label="m")  # a bare name is no hub id


def test_mergekit_reference_forms_translate_to_one_string():
    r = parse_recipe({"merge_method": "linear", "models": [
        {"model": "a+b"}, {"model": {"model": {"path": "org/x", "revision": "r1"}, "lora": {"path": "c"}}}]})
    assert [m.path for m in r.models] == ["a+b", "org/x@r1+c"]


def test_adapter_naming_its_base_by_hub_id(models, hub_cache, tmp_path):
    # PEFT writes the hub id it trained on into adapter_config.json: that base comes from the cache
    adapter = tmp_path / "adapter-hub"
    adapter.mkdir()
    for f in models["adapter"].iterdir():
        adapter.joinpath(f.name).write_bytes(f.read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/tiny-base"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    by_hub = merge(tmp_path, {"method": "linear", "models": [str(adapter), str(models["ft"])]}, "hub")
    local = merge(tmp_path, {"method": "linear", "models": [f"{models['base']}+{models['adapter']}",
                                                           str(models["ft"])]}, "local")
    assert_same(by_hub, local)


def test_continual_merge_on_a_hub_base(models, hub_cache, tmp_path):
    from modalmerge.api import continual_merge
    from modalmerge.procedures.continual import read_state
    first = tmp_path / "first"
    assert main(["merge", str(write_yaml(tmp_path, {"method": "opcm", "base": "org/tiny-base",
                                                    "models": [{"path": str(models["ft"]), "name": "a"}]})),
                 "-o", str(first), "--no-progress"]) == 0
    assert read_state(first)["base"] == "org/tiny-base"  # a hub id, not a path under the working folder
    second = continual_merge(first, models["ft"], tmp_path / "second", name="b")
    assert [m["name"] for m in read_state(second)["models"]] == ["a", "b"]


def write_yaml(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path
