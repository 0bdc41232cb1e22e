"""One composed model, end to end (issue 15, item 2): a LLaVA-style vision MLLM and a
Qwen2-Audio-style audio MLLM, both fine-tuned from one tiny Qwen2 base and saved with their
processors, composed with MMER; `load_composed` then `generate` from one prompt that holds an
image and an audio clip.

The reference is built here, independently of the runtime: the prompt's ids from each source
processor, the image features from the source LLaVA's `get_image_features`, the audio features
from the source Qwen2-Audio's tower and projector, and every merged module of the composed LLM
recomputed per token with its group's materialised weights (θ_0 + m_g ⊙ τ* for a modality's
placeholder tokens, the text weights elsewhere: tests/test_runtime.py's Reference). Greedy
decoding of that reference reruns the whole sequence at every step (no KV cache).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modalmerge.api import merge
from modalmerge.errors import MergeError
from modalmerge.runtime import TEXT, load_composed
from test_mmer import dense_mmer
from test_runtime import Reference, group_weights

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

HIDDEN = 32
SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
# a byte-level BPE as Qwen2's (transformers loads qwen2 and llava folders with Qwen2Tokenizer):
# one token per letter, with and without the leading space
WORDS = SPECIALS + ["Ġ"] + LETTERS + ["Ġ" + c for c in LETTERS]
IMAGE_ID, AUDIO_ID = WORDS.index("<image>"), WORDS.index("<|AUDIO|>")
IMAGE_SIZE, PATCH = 8, 4          # 4 patches: 4 image tokens (the CLS row is dropped)
MEL_BINS, AUDIO_POSITIONS = 16, 50  # 1 s chunks of 100 frames; 0.5 s → 12 audio tokens
PROMPT = "a b <image> c <|AUDIO|> d e"


def save_tokenizer(folder: Path):
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab={w: i for i, w in enumerate(WORDS)}, merges=[("Ġ", c) for c in LETTERS],
                         unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    tok.save_pretrained(folder)
    return tok


def text_config():
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, vocab_size=len(WORDS), tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tune(decoder, head, base, seed: int, scale: float = 0.05):
    """Load the base LLM's weights plus noise into a family's language model and head."""
    g = torch.Generator().manual_seed(seed)
    noisy = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
    decoder.load_state_dict({k[len("model."):]: v for k, v in noisy.items() if k.startswith("model.")})
    head.load_state_dict({"weight": noisy["lm_head.weight"]})


def build(root: Path) -> dict:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration,
                              Qwen2AudioProcessor, Qwen2ForCausalLM, WhisperFeatureExtractor)

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(text_config()).eval()
    base.save_pretrained(root / "base")
    tok = save_tokenizer(root / "base")

    torch.manual_seed(1)
    vision_cfg = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision_cfg.to_dict(),
                                                      text_config=text_config().to_dict(),
                                                      image_token_id=IMAGE_ID)).eval()
    tune(llava.model.language_model, llava.lm_head, base, 11)
    llava.save_pretrained(root / "vision")
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                                      crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                   tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, image_token="<image>").save_pretrained(root / "vision")

    torch.manual_seed(2)
    audio = Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(
        audio_config=dict(d_model=HIDDEN, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
                          num_mel_bins=MEL_BINS, max_source_positions=AUDIO_POSITIONS),
        text_config=text_config().to_dict(), audio_token_id=AUDIO_ID)).eval()
    tune(audio.model.language_model, audio.lm_head, base, 12)
    audio.save_pretrained(root / "audio")
    Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=MEL_BINS, chunk_length=1),
                        tokenizer=tok).save_pretrained(root / "audio")

    merge({"method": "mmer", "base": str(root / "base"),
           "models": [{"path": str(root / "vision"), "name": "vision"}, {"path": str(root / "audio"), "name": "audio"}]},
          root / "composed", exact_stats=True)
    return {"base": base, "vision": llava, "audio": audio, "tok": tok}


def media():
    g = np.random.default_rng(0)
    image = (g.random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 255).astype(np.uint8)
    clip = g.standard_normal(8000).astype(np.float32) * 0.1   # 0.5 s at 16 kHz
    return image, clip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    return root, build(root)


def llm_state(decoder, head) -> dict[str, torch.Tensor]:
    """A family's language model under the base causal LM's names."""
    state = {f"model.{k}": v.detach().clone() for k, v in decoder.state_dict().items()}
    state["lm_head.weight"] = head.weight.detach().clone()
    return state


def projector_rows(model, **inputs) -> torch.Tensor:
    """What the source model's projector gives when the model runs on `inputs` (its own forward)."""
    got = []
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: got.append(out.detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return got[0]


def reference_prompt(root: Path, models: dict, image, clip, prompt: str = PROMPT):
    """(input ids [1, S], group ids [1, S], feature rows by position) built from the source models
    and processors alone: the text between placeholders tokenized as it is, one placeholder per
    feature row."""
    from transformers import CLIPImageProcessor, WhisperFeatureExtractor

    tok = models["tok"]
    pixels = CLIPImageProcessor.from_pretrained(root / "vision")(images=[image], return_tensors="pt")["pixel_values"]
    audio_in = WhisperFeatureExtractor.from_pretrained(root / "audio")(
        [clip], sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
    n_image = (IMAGE_SIZE // PATCH) ** 2
    n_audio = ((int(audio_in["attention_mask"].sum()) - 1) // 2 + 1 - 2) // 2 + 1
    image_rows = projector_rows(models["vision"], input_ids=torch.tensor([[IMAGE_ID] * n_image]),
                                pixel_values=pixels)[0]
    audio_rows = projector_rows(models["audio"], input_ids=torch.tensor([[AUDIO_ID] * n_audio]),
                                input_features=audio_in["input_features"],
                                feature_attention_mask=audio_in["attention_mask"])[0, :n_audio]
    ids, groups, rows = [], [], {}
    for piece in re.split(r"(<image>|<\|AUDIO\|>)", prompt):
        if piece == "<image>":
            rows.update({len(ids) + i: r for i, r in enumerate(image_rows)})
            ids += [IMAGE_ID] * n_image
            groups += [0] * n_image
        elif piece == "<|AUDIO|>":
            rows.update({len(ids) + i: r for i, r in enumerate(audio_rows)})
            ids += [AUDIO_ID] * n_audio
            groups += [1] * n_audio
        elif piece:
            part = tok(piece, add_special_tokens=False)["input_ids"]
            ids += part
            groups += [TEXT] * len(part)
    return torch.tensor([ids]), torch.tensor([groups]), rows


def reference_greedy(models: dict, ids, groups, rows, steps: int, text_key=("mean", (0, 1))):
    """Greedy decoding with every merged module run per token on its group's materialised weights
    (no KV cache: the whole sequence at every step); (first logits, tokens)."""
    import copy

    base = models["base"]
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tuned = [llm_state(models["vision"].model.language_model, models["vision"].lm_head),
             llm_state(models["audio"].model.language_model, models["audio"].lm_head)]
    shared, masks = dense_mmer(base_sd, tuned)
    weights = {TEXT: group_weights(base_sd, shared, masks, text_key)}
    weights.update({i: group_weights(base_sd, shared, masks, ("task", i)) for i in (0, 1)})
    llm = copy.deepcopy(base).eval()
    text_embed = weights[TEXT]["model.embed_tokens.weight"]
    embeds = text_embed[ids[0]].clone()
    for pos, row in rows.items():
        embeds[pos] = row
    first, tokens = None, []
    for _ in range(steps):
        ref = Reference(llm, weights, groups)
        try:
            with torch.no_grad():
                logits = llm(inputs_embeds=embeds.unsqueeze(0)).logits[0, -1]
        finally:
            ref.remove()
        first = logits if first is None else first
        token = int(logits.argmax())
        tokens.append(token)
        if token == 2:  # </s>
            break
        embeds = torch.cat([embeds, text_embed[token].unsqueeze(0)])
        groups = torch.cat([groups, torch.tensor([[TEXT]])], dim=1)
    return first, tokens


def test_generate_from_an_image_and_a_clip_matches_materialised_groups(built):
    root, models = built
    composed = load_composed(root / "composed")
    assert hasattr(composed.llm, "lm_head")  # a causal LM by default
    image, clip = media()
    out = composed.generate(PROMPT, images=[image], audios=[clip], max_new_tokens=6)
    ids, groups, rows = reference_prompt(root, models, image, clip)
    assert torch.equal(out.prompt.input_ids, ids)
    assert torch.equal(out.prompt.group_ids, groups)
    # the feature rows are the source models' own
    got_rows = out.prompt.features
    want_rows = torch.stack([rows[p] for p in sorted(rows)])
    assert (got_rows - want_rows).abs().max() < 1e-5
    first, tokens = reference_greedy(models, ids, groups, rows, 6)
    assert (out.first_logits - first).abs().max() < 1e-4
    assert out.token_ids == tokens
    assert out.text == models["tok"].decode(tokens, skip_special_tokens=True)
    # the routing changes the answer: the same prompt on the text weights alone differs
    with torch.no_grad():
        embeds = composed.llm.get_input_embeddings()(ids)
        embeds[0, sorted(rows)] = want_rows
        plain = composed.llm(inputs_embeds=embeds).logits[0, -1]
    assert (plain - first).abs().max() > 1e-3


def test_features_from_the_users_own_encoders_match_materialised_groups(built):
    """`features`: rows the user's own encoder and projector made, one block per task, placed after
    BOS and before the text; here the source models' own projector rows, so the answer equals the
    media prompt's with the blocks in that place."""
    root, models = built
    composed = load_composed(root / "composed")
    image, clip = media()
    _, _, rows = reference_prompt(root, models, image, clip, "<image> <|AUDIO|>")
    image_rows = torch.stack([rows[p] for p in sorted(rows)[:4]])
    audio_rows = torch.stack([rows[p] for p in sorted(rows)[4:]])
    out = composed.generate(" d e", features=[("vision", image_rows), ("audio", audio_rows)], max_new_tokens=6)
    tok = models["tok"]
    text_ids = tok(" d e", add_special_tokens=False)["input_ids"]
    n_i, n_a = len(image_rows), len(audio_rows)
    filler = tok.pad_token_id
    assert out.prompt.input_ids.tolist() == [[filler] * (n_i + n_a) + text_ids]
    groups = torch.tensor([[0] * n_i + [1] * n_a + [TEXT] * len(text_ids)])
    assert torch.equal(out.prompt.group_ids, groups)
    want_rows = dict(enumerate(torch.cat([image_rows, audio_rows])))
    first, tokens = reference_greedy(models, out.prompt.input_ids, groups, want_rows, 6)
    assert (out.first_logits - first).abs().max() < 1e-4
    assert out.token_ids == tokens
    # a mapping works as the pairs do
    again = composed.generate(" d e", features={"vision": image_rows, "audio": audio_rows}, max_new_tokens=6)
    assert again.token_ids == tokens
    hidden = composed.llm.get_input_embeddings().embedding_dim
    for bad, message in [([("nope", image_rows)], "'nope' is not a task"),
                         ([("vision", image_rows[:, :5])], f"rows must be a [n, {hidden}] tensor"),
                         ([("vision", image_rows[:0])], "(n ≥ 1"),
                         ([("vision", image_rows * float("nan"))], "NaN"),
                         (["vision"], "(task, rows) pairs")]:
        with pytest.raises(MergeError, match=re.escape(message)):
            composed.generate("a", features=bad)


def test_text_mask_present_runs_the_prompt_and_decoding_on_the_modality_present(built):
    """With one modality in the prompt and text_mask="present", m̄ = m_audio: the prefill and
    every decoding step run on the audio task's weights."""
    root, models = built
    composed = load_composed(root / "composed")
    image, clip = media()
    prompt = "a <|AUDIO|> b"
    out = composed.generate(prompt, audios=[clip], max_new_tokens=5, text_mask="present")
    ids, groups, rows = reference_prompt(root, models, image, clip, prompt)
    first, tokens = reference_greedy(models, ids, groups, rows, 5, text_key=("task", 1))
    assert (out.first_logits - first).abs().max() < 1e-4
    assert out.token_ids == tokens
    # the stored text weights are back after it
    text = composed.folder.text
    for name, p in composed.llm.named_parameters():
        if name in composed.folder.tensors:
            assert torch.equal(p, text.read(name))


def test_text_only_prompt_is_plain_generation_of_the_text_weights(built):
    from transformers import AutoModelForCausalLM

    root, models = built
    composed = load_composed(root / "composed")
    out = composed.generate("a b c d", max_new_tokens=5)
    assert (out.prompt.group_ids == TEXT).all()
    plain = AutoModelForCausalLM.from_pretrained(root / "composed").eval()
    ids = models["tok"]("a b c d", return_tensors="pt")["input_ids"]
    want = plain.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out.token_ids == want
    # sampling: seeded, so repeatable
    a = composed.generate("a b", max_new_tokens=4, do_sample=True, temperature=0.8, top_k=5, top_p=0.9, seed=3)
    b = composed.generate("a b", max_new_tokens=4, do_sample=True, temperature=0.8, top_k=5, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids


def test_model_cls_still_chooses_the_head(built):
    from transformers import AutoModel

    root, _ = built
    composed = load_composed(root / "composed", AutoModel)
    assert not hasattr(composed.llm, "lm_head")


def one_line_error(fn) -> str:
    with pytest.raises(MergeError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_processor_and_missing_modality_are_one_line_errors(built, tmp_path):
    from transformers import Qwen2ForCausalLM

    root, models = built
    image, clip = media()
    # the vision modality's processor files are gone: the error names the folder and the fix
    shutil.copytree(root / "composed", tmp_path / "composed")
    (tmp_path / "composed" / "modalities" / "vision" / "processor_config.json").unlink()
    composed = load_composed(tmp_path / "composed")
    msg = one_line_error(lambda: composed.generate("a", images=[image]))
    assert "vision" in msg and "processor" in msg
    # a composed model with no vision modality (an audio MLLM and a text-only fine-tune)
    text_ft = Qwen2ForCausalLM(text_config())
    text_ft.load_state_dict(models["base"].state_dict())
    with torch.no_grad():
        for p in text_ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    text_ft.save_pretrained(tmp_path / "math")
    merge({"method": "mmer", "base": str(root / "base"),
           "models": [{"path": str(root / "audio"), "name": "audio"}, {"path": str(tmp_path / "math"), "name": "math"}]},
          tmp_path / "audio_math", exact_stats=True)
    composed = load_composed(tmp_path / "audio_math")
    msg = one_line_error(lambda: composed.generate("a", images=[image]))
    assert "no image modality" in msg
    one_line_error(lambda: composed.modality("math"))     # a text-only task has no towers
    out = composed.generate("a <|AUDIO|> b", audios=[clip], max_new_tokens=2)
    assert set(out.prompt.group_ids.unique().tolist()) == {TEXT, 0}
    msg = one_line_error(lambda: composed.generate("a <|AUDIO|> <|AUDIO|>", audios=[clip]))
    assert "2 '<|AUDIO|>'" in msg


def test_compose_copies_each_source_processor(built):
    from transformers import AutoProcessor

    root, _ = built
    for task in ("vision", "audio"):
        folder = root / "composed" / "modalities" / task
        assert (folder / "processor_config.json").is_file() and (folder / "tokenizer.json").is_file()
        assert type(AutoProcessor.from_pretrained(folder)) is type(AutoProcessor.from_pretrained(root / task))


def test_mrope_families_are_refused_with_one_line(tmp_path):
    from modalmerge.runtime.multimodal import build_family_model
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen2_vl", text_config={"rope_parameters": {"rope_type": "default",
                                                                               "mrope_section": [1, 1, 2]}})
    msg = one_line_error(lambda: build_family_model("vision", tmp_path, config, torch.nn.Embedding(2, 2),
                                                    torch.device("cpu"), torch.float32))
    assert "mrope" in msg


def test_readme_serving_snippet_runs_as_written(built, tmp_path, monkeypatch):
    from PIL import Image

    root, _ = built
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    after = readme.split("<!-- mmer-serving-snippet", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", after, re.S).group(1)
    shutil.copytree(root / "composed", tmp_path / "composed")
    image, _ = media()
    Image.fromarray(image).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    assert len(scope["out"].token_ids) >= 1 and isinstance(scope["out"].text, str)
    assert set(scope["out"].prompt.group_ids.unique().tolist()) == {TEXT, 0, 1}


def test_generate_command(built, tmp_path, capsys):
    import json
    import wave

    from PIL import Image

    from modalmerge.cli import main

    root, _ = built
    image, clip = media()
    Image.fromarray(image).save(tmp_path / "photo.png")
    with wave.open(str(tmp_path / "clip.wav"), "wb") as w:   # 8 kHz: resampled to the extractor's 16 kHz
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes((clip[::2] * 32767).astype(np.int16).tobytes())
    np.save(tmp_path / "clip.npy", clip)
    args = ["generate", str(root / "composed"), "--text", PROMPT, "--image", str(tmp_path / "photo.png"),
            "--max-new-tokens", "3", "--json"]
    assert main(args + ["--audio", str(tmp_path / "clip.npy")]) == 0
    got = json.loads(capsys.readouterr().out)
    want = load_composed(root / "composed").generate(PROMPT, images=[image], audios=[clip], max_new_tokens=3)
    assert got["token_ids"] == want.token_ids and got["prompt_tokens"] == want.prompt.input_ids.shape[1]
    assert main(args + ["--audio", str(tmp_path / "clip.wav")]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == want.prompt.input_ids.shape[1]
    assert main(["generate", str(root / "composed"), "--image", str(tmp_path / "missing.png")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.png" in err and "\n" not in err


def test_compose_copies_a_processor_saved_beside_a_lora_adapter(tmp_path):
    """An adapter's config files are the MLLM's it was trained on; a processor saved with the
    adapter itself is copied too (and wins over the MLLM's)."""
    import json

    from tiny_mllm import build_family, recipe

    fam = build_family(tmp_path / "models")
    (fam["paths"]["video"] / "preprocessor_config.json").write_text(json.dumps({"from": "adapter"}))
    (tmp_path / "models" / "video_mllm" / "preprocessor_config.json").write_text(json.dumps({"from": "mllm"}))
    merge(recipe(fam, ("vision", "video")), tmp_path / "out", exact_stats=True)
    folder = tmp_path / "out" / "modalities" / "video"
    assert json.loads((folder / "preprocessor_config.json").read_text()) == {"from": "adapter"}
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llava"
