"""Tiny multimodal models on one tiny Llama base, saved as the tests need them.

- vision: LLaVA-1.5 layout (`language_model.model.layers…`, `vision_tower.`, `multi_modal_projector.`)
- audio:  Qwen2-Audio layout (`language_model.`, `audio_tower.`, `multi_modal_projector.`)
- video:  transformers-5 LLaVA layout (`model.language_model.layers…`, `lm_head.`, `model.vision_tower.`),
          its LLM tuned with LoRA: a PEFT adapter whose config names the MLLM it was trained on
- math:   a plain LLM fine-tune (a new task: no encoder)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from conftest import perturbed, tiny_llama

HIDDEN = 32


def encoder_tensors(prefix: str, proj_prefix: str, in_dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}0.weight": torch.randn(16, in_dim, generator=g) * 0.2,
        f"{prefix}0.bias": torch.randn(16, generator=g) * 0.1,
        f"{prefix}2.weight": torch.randn(16, 16, generator=g) * 0.2,
        f"{proj_prefix}linear_1.weight": torch.randn(HIDDEN, 16, generator=g) * 0.2,
        f"{proj_prefix}linear_1.bias": torch.randn(HIDDEN, generator=g) * 0.1,
    }


def _save(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def llm_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_family(root: Path) -> dict:
    """Save the base LLM and the four models; return paths and the canonical LLM state dicts."""
    root = Path(root)
    base = tiny_llama()
    base.save_pretrained(root / "base")
    base_sd = llm_state(base)
    llm_cfg = json.loads((root / "base" / "config.json").read_text())
    out = {"base": root / "base", "base_sd": base_sd, "llm": {}, "mm": {}}

    vision_llm = llm_state(perturbed(base, 21, 0.03))
    vision_mm = encoder_tensors("vision_tower.", "multi_modal_projector.", 12, 1)
    _save(root / "vision", {**{f"language_model.{k}": v for k, v in vision_llm.items()}, **vision_mm},
          {"model_type": "llava", "text_config": llm_cfg})
    out["llm"]["vision"], out["mm"]["vision"] = vision_llm, vision_mm

    audio_llm = llm_state(perturbed(base, 22, 0.03))
    audio_mm = encoder_tensors("audio_tower.", "multi_modal_projector.", 10, 2)
    _save(root / "audio", {**{f"language_model.{k}": v for k, v in audio_llm.items()}, **audio_mm},
          {"model_type": "qwen2_audio", "text_config": llm_cfg})
    out["llm"]["audio"], out["mm"]["audio"] = audio_llm, audio_mm

    # video: the MLLM before LLM tuning (base LLM inside), and a LoRA adapter trained on it
    def new_layout(k: str) -> str:
        return k if k.startswith("lm_head.") else "model.language_model." + k[len("model."):]
    video_mm = encoder_tensors("model.vision_tower.", "model.multi_modal_projector.", 8, 3)
    _save(root / "video_mllm", {**{new_layout(k): v for k, v in base_sd.items()}, **video_mm},
          {"model_type": "llava", "text_config": llm_cfg})
    g = torch.Generator().manual_seed(5)
    adapter, video_llm = {}, {k: v.clone() for k, v in base_sd.items()}
    r, alpha = 2, 4
    for i in range(2):
        for proj in ("q_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{proj}"
            w = base_sd[f"{key}.weight"]
            a = torch.randn(r, w.shape[1], generator=g) * 0.2
            b = torch.randn(w.shape[0], r, generator=g) * 0.2
            mkey = "base_model.model." + new_layout(key)
            adapter[f"{mkey}.lora_A.weight"], adapter[f"{mkey}.lora_B.weight"] = a, b
            video_llm[f"{key}.weight"] = w + (b @ a) * (alpha / r)
    (root / "video").mkdir()
    save_file(adapter, str(root / "video" / "adapter_model.safetensors"))
    (root / "video" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(root / "video_mllm")}))
    out["llm"]["video"], out["mm"]["video"] = video_llm, video_mm

    math = perturbed(base, 24, 0.03)
    math.save_pretrained(root / "math")
    out["llm"]["math"], out["mm"]["math"] = llm_state(math), {}
    out["paths"] = {n: root / n for n in ("vision", "audio", "video", "math")}
    return out


def recipe(family: dict, tasks=("vision", "audio", "video"), **params) -> dict:
    return {"method": "mmer", "base": str(family["base"]),
            "models": [{"path": str(family["paths"][t]), "name": t} for t in tasks], "params": params}
