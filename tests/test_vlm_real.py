"""The real-LLM vision-language model end to end with few steps: SmolLM2-135M with a (barely
pretrained) vision tower from `emloc.vqa`, on easy-vqa image records."""

import json

import pytest
import torch

pytestmark = pytest.mark.integration
LLM = "model.language_model.layers"


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    pytest.importorskip("easy_vqa")
    pytest.importorskip("gguf")
    from emloc.models import resolve_model
    from emloc.vqa import build_vqa_model, task_records

    try:
        resolve_model("smollm2-135m")
    except Exception as exc:  # the package is an optional install
        pytest.skip(f"SmolLM2 not available: {exc}")
    root = tmp_path_factory.mktemp("vqa")
    model = build_vqa_model(root / "vlm", steps=2, captions=36, held=4)  # the real recipe takes ~10 min: 2 steps here
    files = []
    for name, split, n in (("train", "train", 24), ("eval", "test", 8)):
        files.append(root / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in task_records(split, n)))
    return model, files[0], files[1]


def test_the_prepared_model_is_smollm2_with_a_vision_tower(vqa):
    from transformers import AutoModelForImageTextToText

    from emloc.families import IMAGE_TEXT, family_of
    from emloc.models import resolve_model

    model, _, _ = vqa
    source = json.loads((model / "emloc-source.json").read_text())
    assert source["recipe"]["steps"] == 2 and 0 <= source["held_out_caption_accuracy"] <= 1
    vlm = AutoModelForImageTextToText.from_pretrained(model)
    assert family_of(vlm.config) is IMAGE_TEXT
    from safetensors import safe_open

    from emloc.models import weight_files

    llm = resolve_model("smollm2-135m")  # the language model's weights are SmolLM2's, bit for bit
    with safe_open(weight_files(llm)[0], "pt") as f:
        w = f.get_tensor("model.layers.7.mlp.down_proj.weight")
    assert torch.equal(vlm.model.language_model.layers[7].mlp.down_proj.weight, w)


def test_real_vlm_through_build_train_correct_eval(tmp_path, vqa):
    from emloc import EmulatorConfig, TrainConfig, build_emulator, correct_adapter, train_adapter
    from emloc.correct import CorrectConfig
    from emloc.evaluate import EvalConfig, evaluate

    model, train, held = vqa
    rules = [(r"model\.language_model\.layers\.(0|1)\..*", 0.5)]  # two blocks compressed: a quick build
    emu = build_emulator(model, train, tmp_path / "emu", EmulatorConfig(ratio=rules, samples=8, max_length=128, method="svd",
                                                                         device="cpu"))
    man = json.loads((emu / "manifest.json").read_text())
    compressed = [k for k, v in man["layers"].items() if v.get("rank") is not None]
    assert man["family"] == "image-text-to-text" and len(compressed) == 14
    assert all(k.startswith(f"{LLM}.0.") or k.startswith(f"{LLM}.1.") for k in compressed)
    assert man["calibration"]["tokens"] >= 8 * 16  # 16 image tokens per record
    ad = train_adapter(emu, train, tmp_path / "ad", TrainConfig(steps=2, batch_size=4, max_length=128, lr=1e-3, eval_every=0,
                                                                eval_samples=4, device="cpu"), eval_data=held)
    cor = correct_adapter(ad, tmp_path / "cor", CorrectConfig(mode="weighted", device="cpu"))
    zero = evaluate(model, held, config=EvalConfig(max_length=128, device="cpu"))
    tuned = evaluate(model, held, cor, config=EvalConfig(max_length=128, device="cpu"))
    for r in (zero, tuned):
        assert r["records"] == 8 and r["em_records"] == 8 and 0 < r["nll"] < 20
    assert tuned["nll"] != zero["nll"]
