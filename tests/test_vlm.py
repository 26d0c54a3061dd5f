"""Vision-language models through the family table: a tiny Llava whose vision tower has MORE block
parameters than its language model. Only the language model's blocks are compressed and LoRA'd,
and the adapters load with plain PEFT on `AutoModelForImageTextToText` (text calibration only:
image records are not supported yet)."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import make_data, make_tokenizer

LLM = "model.language_model.layers"


def make_llava(path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForImageTextToText, LlavaConfig

    tok = make_tokenizer()
    n = len(tok)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=n + 1, eos_token_id=tok.eos_token_id)
    vision = dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, image_size=32, patch_size=8)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=n, projector_hidden_act="gelu",
                      vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return make_llava(tmp_path_factory.mktemp("vlm") / "llava")


def _image_batch(n_tokens: int, image_token: int):
    ids = torch.tensor([[image_token] * 16 + list(range(4, 4 + n_tokens))])  # 16 patches of a 32 px image (patch 8)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 32, 32)}


def test_blocks_are_the_language_models(llava):
    from emloc.families import IMAGE_TEXT, family_of
    from emloc.models import empty_model, find_blocks, load_config

    cfg = load_config(llava)
    assert family_of(cfg) is IMAGE_TEXT
    model = empty_model(cfg)
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    name, blocks = find_blocks(model)
    assert name == LLM and sum(p.numel() for p in blocks.parameters()) < vision  # the larger stack is not chosen


def test_emulator_compresses_only_the_llm_and_ratio_one_is_exact(tmp_path, llava):
    from emloc import EmulatorConfig, build_emulator, load_emulator
    from transformers import AutoModelForImageTextToText

    data = make_data(tmp_path / "d.jsonl", 20)
    emu = build_emulator(llava, data, tmp_path / "emu", EmulatorConfig(ratio=0.5, samples=8, method="svd", device="cpu"))
    man = json.loads((emu / "manifest.json").read_text())
    assert man["family"] == "image-text-to-text" and man["blocks"] == LLM
    assert man["layers"] and all(k.startswith(LLM) for k in man["layers"])
    dense = build_emulator(llava, data, tmp_path / "dense", EmulatorConfig(ratio=1.0, samples=8, method="svd", device="cpu"))
    orig = AutoModelForImageTextToText.from_pretrained(llava).eval()
    copy = load_emulator(dense, "cpu", "float32").eval()
    torch.manual_seed(0)
    batch = _image_batch(6, orig.config.image_token_id)
    with torch.no_grad():
        torch.testing.assert_close(copy(**batch).logits, orig(**batch).logits, atol=1e-4, rtol=1e-4)


def test_lora_targets_the_llm_and_the_corrected_adapter_loads_with_plain_peft(tmp_path, llava):
    from emloc import EmulatorConfig, TrainConfig, build_emulator, correct_adapter, merge_adapter, train_adapter
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    data = make_data(tmp_path / "d.jsonl", 20)
    emu = build_emulator(llava, data, tmp_path / "emu", EmulatorConfig(ratio=0.5, samples=8, method="svd", device="cpu"))
    ad = train_adapter(emu, data, tmp_path / "ad", TrainConfig(steps=2, batch_size=4, lr=1e-2, device="cpu"))
    keys = list(load_file(ad / "adapter_model.safetensors"))
    assert keys and all(f".{LLM}." in k for k in keys)
    from emloc.correct import CorrectConfig

    cor = correct_adapter(ad, tmp_path / "cor", config=CorrectConfig(mode="weighted"))
    base = AutoModelForImageTextToText.from_pretrained(llava).eval()
    peft = PeftModel.from_pretrained(base, cor).eval()
    merged = AutoModelForImageTextToText.from_pretrained(merge_adapter(llava, cor, tmp_path / "merged")).eval()
    batch = _image_batch(6, base.config.image_token_id)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, peft(**batch).logits, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
_SIGLIP = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=8)
VLM_CONFIGS = {  # each vision tower has more block parameters than its language model
    "qwen2_vl": dict(text_config=dict(model_type="qwen2_vl_text", **_TEXT),
                     vision_config=dict(depth=4, embed_dim=48, hidden_size=32, num_heads=4, mlp_ratio=2)),
    "qwen2_5_vl": dict(text_config=dict(model_type="qwen2_5_vl_text", **_TEXT),
                       vision_config=dict(depth=4, hidden_size=48, out_hidden_size=32, num_heads=4, intermediate_size=96)),
    "idefics3": dict(text_config=dict(model_type="llama", **_TEXT), vision_config=_SIGLIP),
    "smolvlm": dict(text_config=dict(model_type="llama", **_TEXT), vision_config=_SIGLIP),
    "gemma3": dict(text_config=dict(model_type="gemma3_text", head_dim=8, **_TEXT),
                   vision_config=dict(model_type="siglip_vision_model", **_SIGLIP), mm_tokens_per_image=4),
    "internvl": dict(text_config=dict(model_type="qwen2", **_TEXT),
                     vision_config=dict(_SIGLIP, image_size=[32, 32], patch_size=[8, 8])),
}


@pytest.mark.parametrize("model_type", sorted(VLM_CONFIGS))
def test_block_resolution_picks_the_language_model(model_type):
    from transformers import AutoConfig

    from emloc.families import IMAGE_TEXT, family_of
    from emloc.models import empty_model, find_blocks
    from emloc.train import default_targets

    cfg = AutoConfig.for_model(model_type, **VLM_CONFIGS[model_type])
    assert family_of(cfg) is IMAGE_TEXT
    model = empty_model(cfg)
    name, blocks = find_blocks(model)
    decoder = model.get_decoder()
    assert any(b is blocks for b in decoder.modules()) and len(blocks) == 2  # inside the language model

    pattern = re.compile(default_targets(model))  # LoRA's default targets: the language model's linears only
    hits = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]
    assert hits and all(n.startswith(name + ".") for n in hits)
