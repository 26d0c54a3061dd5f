"""Vision-language models through the family table: a tiny Llava (with a processor) whose vision tower
has MORE block parameters than its language model. Only the language model's blocks are compressed and
LoRA'd, image records run through calibration, training, evaluation and correction, and the adapters
load with plain PEFT on `AutoModelForImageTextToText`."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import make_data, make_tokenizer

LLM = "model.language_model.layers"


# A chat template that renders TRL content parts ({"type": "image"} -> <image>, text parts as text).
VLM_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
                "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}"
                "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}


def make_llava(path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForImageTextToText, LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = make_tokenizer()
    n = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<image>"]})
    assert tok.convert_tokens_to_ids("<image>") == n
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=n + 1, eos_token_id=tok.eos_token_id)
    vision = dict(model_type="siglip_vision_model", hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, image_size=32, patch_size=8)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=n, projector_hidden_act="gelu",
                      vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg)
    model.save_pretrained(path)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, vision_feature_select_strategy="full",
                   num_additional_image_tokens=0, chat_template=VLM_TEMPLATE, image_token="<image>").save_pretrained(path)
    return path


def make_image_data(path: Path, n: int = 24, seed: int = 0) -> Path:
    """JSONL of TRL image records ("what is the color ?" -> the colour of a noisy square), PNGs beside it."""
    import random

    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        color = rng.choice(sorted(COLORS))
        px = np.clip(np.array(COLORS[color]) + np.random.default_rng(seed * 1000 + i).normal(0, 20, (40, 40, 3)), 0, 255)
        Image.fromarray(px.astype("uint8")).save(path.parent / "images" / f"{seed}-{i}.png")
        rows.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the color ?"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": f"{color} ."}]}],
                     "images": [f"images/{seed}-{i}.png"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
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
_MROPE = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}  # sums to head_dim / 2 = 4
VLM_CONFIGS = {  # each vision tower has more block parameters than its language model
    "qwen2_vl": dict(text_config=dict(model_type="qwen2_vl_text", rope_parameters=_MROPE, **_TEXT),
                     vision_config=dict(depth=4, embed_dim=48, hidden_size=32, num_heads=4, mlp_ratio=2)),
    "qwen2_5_vl": dict(text_config=dict(model_type="qwen2_5_vl_text", rope_parameters=_MROPE, **_TEXT),
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


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> Path:
    return make_image_data(tmp_path_factory.mktemp("images") / "train.jsonl", 24)


def test_image_records_have_pixel_inputs_and_answer_only_labels(llava, image_data):
    from emloc.data import IGNORE, load_examples
    from emloc.models import load_processor, load_tokenizer

    tok, proc = load_tokenizer(llava), load_processor(llava)
    examples = load_examples(image_data, tok, 128, proc)
    rows = [json.loads(line) for line in image_data.read_text().splitlines()]
    assert len(examples) == len(rows)
    image_id = tok.convert_tokens_to_ids("<image>")
    for e, row in zip(examples, rows):
        assert tuple(e.extras["pixel_values"].shape) == (1, 3, 32, 32)
        assert e.input_ids.count(image_id) == 16  # (32 / 8)^2 patches
        answer = [t for t, y in zip(e.input_ids, e.labels) if y != IGNORE]
        assert tok.decode(answer, skip_special_tokens=True).split() == row["messages"][1]["content"][0]["text"].split()
        assert e.labels[e.prompt_len] == e.input_ids[e.prompt_len] and e.labels[e.prompt_len - 1] == IGNORE


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_image_record_errors_name_the_problem(tmp_path, llava, image_data):
    from emloc.data import load_examples
    from emloc.errors import EmlocError
    from emloc.models import load_processor, load_tokenizer

    tok, proc = load_tokenizer(llava), load_processor(llava)
    row = json.loads(image_data.read_text().splitlines()[0])
    row["images"] = [str(image_data.parent / p) for p in row["images"]]  # absolute paths work from anywhere
    assert load_examples(_write(tmp_path / "abs.jsonl", [row]), tok, 128, proc)
    with pytest.raises(EmlocError, match="text-only model"):
        load_examples(image_data, tok, 128, None)
    with pytest.raises(EmlocError, match="does not exist"):
        load_examples(_write(tmp_path / "missing.jsonl", [dict(row, images=["nope.png"])]), tok, 128, proc)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(EmlocError, match="cannot be read"):
        load_examples(_write(tmp_path / "bad.jsonl", [dict(row, images=["bad.png"])]), tok, 128, proc)
    with pytest.raises(EmlocError, match="1 image parts .* but 2 files"):
        load_examples(_write(tmp_path / "two.jsonl", [dict(row, images=row["images"] * 2)]), tok, 128, proc)
    with pytest.raises(EmlocError, match="raise --max-length"):  # cutting image tokens is never done
        load_examples(image_data, tok, 12, proc)


def test_calibration_sees_the_merged_image_and_text_embeddings(llava, image_data):
    from transformers import AutoModelForImageTextToText

    from emloc.data import calibration_records, collate
    from emloc.models import load_processor, load_tokenizer
    from emloc.stream import StreamedModel

    records = calibration_records(image_data, load_tokenizer(llava), 4, 128, 0, processor=load_processor(llava))
    stream = StreamedModel(llava)
    stream.load_outside(torch.device("cpu"), torch.float32)
    captured = stream.capture(records, torch.device("cpu"))
    assert len(captured) == 1  # four records of one length: one batch
    orig = AutoModelForImageTextToText.from_pretrained(llava).eval()
    seen = []
    orig.model.language_model.layers[0].register_forward_pre_hook(lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]),
                                                                   with_kwargs=True)
    order = sorted(range(4), key=lambda i: -len(records[i].input_ids))  # the engine batches longest first
    batch = collate([records[i] for i in order], 0)
    with torch.no_grad():
        orig(**{k: v for k, v in batch.items() if k != "labels"})
    torch.testing.assert_close(captured[0].hidden, seen[0])
    image_rows = batch["input_ids"] == orig.config.image_token_id
    text_embedding = orig.get_input_embeddings().weight[orig.config.image_token_id]
    assert not torch.allclose(captured[0].hidden[image_rows][0], text_embedding)  # the image features, not the token


def test_image_records_through_build_train_correct_eval_merge(tmp_path, llava, image_data):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from emloc import EmulatorConfig, TrainConfig, build_emulator, correct_adapter, merge_adapter, train_adapter
    from emloc.correct import CorrectConfig
    from emloc.evaluate import EvalConfig, evaluate

    emu = build_emulator(llava, image_data, tmp_path / "emu", EmulatorConfig(ratio=0.5, samples=8, method="svd", device="cpu"))
    man = json.loads((emu / "manifest.json").read_text())
    assert man["calibration"]["tokens"] >= 8 * 16  # the image tokens are part of the calibration
    ad = train_adapter(emu, image_data, tmp_path / "ad", TrainConfig(steps=3, batch_size=4, lr=1e-2, device="cpu",
                                                                     eval_fraction=0.25))
    log = json.loads((ad / "manifest.json").read_text())
    assert all(k.startswith(("base_model.model." + LLM)) for k in load_file(ad / "adapter_model.safetensors"))
    assert log["final_eval_loss"] is not None and log["final_eval_loss"] == log["final_eval_loss"]
    cor = correct_adapter(ad, tmp_path / "cor", config=CorrectConfig(mode="weighted"))
    res = evaluate(llava, image_data, cor, config=EvalConfig(device="cpu", batch_size=4))
    assert res["records"] == 24 and res["em_records"] == 24 and 0 < res["nll"] < 50
    merged = merge_adapter(llava, cor, tmp_path / "merged")
    base = AutoModelForImageTextToText.from_pretrained(llava).eval()
    peft = PeftModel.from_pretrained(base, cor).eval()
    with torch.no_grad():
        a = evaluate(merged, image_data, config=EvalConfig(device="cpu", batch_size=4, exact_match=False))
    assert a["nll"] == pytest.approx(res["nll"], rel=1e-4)
    # processor round trip: the merged folder's processor gives the same model inputs as the base's
    row = json.loads(image_data.read_text().splitlines()[0])
    from PIL import Image

    img = Image.open(image_data.parent / row["images"][0]).convert("RGB")
    outs = []
    for folder in (llava, merged):
        proc = AutoProcessor.from_pretrained(folder)
        text = proc.apply_chat_template(row["messages"], tokenize=False)
        outs.append(proc(text=[text], images=[img], return_tensors="pt"))
    assert outs[0]["input_ids"].tolist() == outs[1]["input_ids"].tolist()
    torch.testing.assert_close(outs[0]["pixel_values"], outs[1]["pixel_values"], rtol=0, atol=0)
    with torch.no_grad():
        b = {k: v for k, v in outs[0].items()}
        torch.testing.assert_close(AutoModelForImageTextToText.from_pretrained(merged).eval()(**b).logits, peft(**b).logits,
                                   atol=1e-4, rtol=1e-4)


def test_vision_tower_is_compressed_only_where_a_ratio_table_asks(tmp_path, llava, image_data):
    from transformers import AutoModelForImageTextToText

    from emloc import EmulatorConfig, TrainConfig, build_emulator, correct_adapter, load_emulator, train_adapter
    from emloc.correct import CorrectConfig
    from emloc.errors import EmlocError
    from emloc.lowrank import LowRankLinear

    vision = "model.vision_tower.encoder.layers"
    rules = [(r"vision_tower.*\.mlp\.", 0.5), (r"language_model", 0.5)]  # as the reference code's `vision_model.*layers.*`
    emu = build_emulator(llava, image_data, tmp_path / "emu", EmulatorConfig(ratio=rules, samples=8, method="svd", device="cpu"))
    man = json.loads((emu / "manifest.json").read_text())
    assert man["vision_blocks"] == vision and man["blocks"] == LLM
    seen = {k for k, v in man["layers"].items() if v["rank"] is not None and k.startswith(vision)}
    assert seen == {f"{vision}.{i}.mlp.{fc}" for i in range(4) for fc in ("fc1", "fc2")}  # attention stays dense
    assert all(0 <= man["layers"][k]["rel_error"] < 1 for k in seen)
    model = load_emulator(emu, "cpu", "float32")
    assert isinstance(model.get_submodule(f"{vision}.2.mlp.fc1"), LowRankLinear)
    assert type(model.get_submodule(f"{vision}.2.self_attn.q_proj")) is torch.nn.Linear
    orig = AutoModelForImageTextToText.from_pretrained(llava).eval()  # everything outside both stacks is the original's
    for name in ("model.multi_modal_projector.linear_1.weight", "model.vision_tower.post_layernorm.weight"):
        torch.testing.assert_close(model.get_parameter(name), orig.get_parameter(name), rtol=0, atol=0)
    batch = _image_batch(6, orig.config.image_token_id)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    ad = train_adapter(emu, image_data, tmp_path / "ad", TrainConfig(steps=2, batch_size=4, lr=1e-2, device="cpu"))
    assert all(f".{LLM}." in k for k in load_file(ad / "adapter_model.safetensors"))  # LoRA stays on the language model
    correct_adapter(ad, tmp_path / "cor", CorrectConfig(mode="weighted", device="cpu"))
    text = make_data(tmp_path / "text.jsonl", 12)
    with pytest.raises(EmlocError, match="no calibration record has an image"):
        build_emulator(llava, text, tmp_path / "e2", EmulatorConfig(ratio=rules, samples=8, method="svd", device="cpu"))
    assert not (tmp_path / "e2").exists()


def test_paper_correction_identity_per_layer_on_the_vlm(tmp_path, llava, image_data):
    """Inside each LoRA's input subspace, the original + corrected LoRA equals the emulator + trained LoRA."""
    from emloc import EmulatorConfig, TrainConfig, build_emulator, correct_adapter, load_emulator, train_adapter
    from emloc.correct import CorrectConfig
    from transformers import AutoModelForImageTextToText

    emu = build_emulator(llava, image_data, tmp_path / "emu", EmulatorConfig(ratio=0.4, samples=8, method="svd", device="cpu"))
    ad = train_adapter(emu, image_data, tmp_path / "ad", TrainConfig(steps=2, batch_size=4, lr=5e-2, device="cpu", eval_fraction=0))
    cor = correct_adapter(ad, tmp_path / "cor", CorrectConfig(mode="paper", clamp=None, device="cpu"))
    cfg = json.loads((ad / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    a, c = load_file(ad / "adapter_model.safetensors"), load_file(cor / "adapter_model.safetensors")
    base = AutoModelForImageTextToText.from_pretrained(llava, dtype=torch.float64)
    em = load_emulator(emu, "cpu", "float32").double()
    checked = 0
    for key in (k for k in a if k.endswith("lora_A.weight")):
        name = key[len("base_model.model."):-len(".lora_A.weight")]
        w = base.get_submodule(name).weight
        lin = em.get_submodule(name)
        w_e = lin.dense_weight(torch.float64) if hasattr(lin, "dense_weight") else lin.weight
        la, lb = a[key].double(), a[key.replace("lora_A", "lora_B")].double()
        ca, cb = c[key].double(), c[key.replace("lora_A", "lora_B")].double()
        x = torch.randn(5, la.shape[0], dtype=torch.float64) @ la
        with torch.no_grad():
            torch.testing.assert_close(x @ (w + s * cb @ ca).T, x @ (w_e + s * lb @ la).T, atol=1e-6, rtol=1e-6)
        checked += 1
    assert checked == 14  # 7 linears x 2 blocks of the language model


@pytest.mark.parametrize("model_type", sorted(VLM_CONFIGS))
def test_every_vlm_builds_on_its_language_model_and_ratio_one_is_exact(tmp_path, model_type):
    """Text calibration through each VLM's own forward: only language-model layers are compressed, and
    at ratio 1.0 the emulator's logits are the original's."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from emloc import EmulatorConfig, build_emulator, load_emulator

    cfg = AutoConfig.for_model(model_type, **VLM_CONFIGS[model_type])
    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForImageTextToText.from_config(cfg).save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    data = make_data(tmp_path / "d.jsonl", 12)
    half = build_emulator(base, data, tmp_path / "half", EmulatorConfig(ratio=0.5, samples=6, method="svd", device="cpu"))
    man = json.loads((half / "manifest.json").read_text())
    compressed = [k for k, v in man["layers"].items() if v["rank"] is not None]
    assert compressed and all(k.startswith(man["blocks"] + ".") for k in compressed)
    assert "vision" not in man["blocks"] and "visual" not in man["blocks"]
    dense = build_emulator(base, data, tmp_path / "dense", EmulatorConfig(ratio=1.0, samples=6, method="svd", device="cpu"))
    ids = torch.tensor([[5, 9, 14, 22, 30, 7]])
    orig = AutoModelForImageTextToText.from_pretrained(base).eval()
    with torch.no_grad():
        torch.testing.assert_close(load_emulator(dense, "cpu", "float32")(input_ids=ids).logits, orig(input_ids=ids).logits,
                                   rtol=0, atol=0)
