"""Quantised embedding and output head in an emulator (`--vocab-format`), on tiny models."""

import json

import pytest
import torch
from safetensors.torch import load_file

from emloc import CorrectConfig, EmlocError, EmulatorConfig, TrainConfig, build_emulator, correct_adapter, load_emulator, train_adapter
from emloc import quant
from emloc.data import collate, load_examples
from emloc.loss import answer_nll
from emloc.models import WeightStore, load_tokenizer
from emloc.quant import FORMATS, QuantLinear, dequantize, pack, quantize_rtn
from emloc.vocab import QuantEmbedding

from .conftest import make_model_dir


def _rtn(w: torch.Tensor, fmt: str) -> torch.Tensor:
    f = FORMATS[fmt]
    codes, scales = quantize_rtn(w.float(), f)
    return dequantize(pack(codes, f), scales, f, w.shape[1], torch.float32)


@pytest.fixture(scope="module")
def untied_base(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("untied") / "base", "qwen2")


@pytest.mark.parametrize("family,fmt", [("qwen2", "nf4"), ("qwen2", "int8"), ("llama", "nf4")])
def test_vocab_quantised_emulator_is_the_keep_emulator_with_rounded_vocab(tmp_path, tiny_data, family, fmt):
    base = make_model_dir(tmp_path / "base", family)  # llama: tied embedding; qwen2: untied
    kw = dict(ratio=0.5, method="quant", samples=16, device="cpu")
    keep = build_emulator(base, tiny_data, tmp_path / "keep", EmulatorConfig(**kw))
    emu = build_emulator(base, tiny_data, tmp_path / "vocab", EmulatorConfig(**kw, vocab_format=fmt))
    m = json.loads((emu / "manifest.json").read_text())
    v = m["vocab"]
    tied = family == "llama"
    assert v["tied"] is tied and v["format"] == fmt and v["fraction"] < (0.29 if fmt == "nf4" else 0.54)  # d = 32: one float16 scale per 32
    stored = {}
    for f in emu.glob("*.safetensors"):
        stored.update(load_file(f))
    assert f"{v['embedding']}.weight" not in stored and f"{v['head']}.weight" not in stored
    assert (f"{v['head']}.qweight" in stored) is not tied  # a tied head's codes are the embedding's, stored once
    # the block layers are the same as without --vocab-format (same calibration, same rounding)
    ref = load_emulator(keep, device="cpu")
    got = load_emulator(emu, device="cpu")
    assert isinstance(got.get_input_embeddings(), QuantEmbedding) and isinstance(got.get_output_embeddings(), QuantLinear)
    if tied:
        assert got.get_output_embeddings().qweight is got.get_input_embeddings().qweight
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(_rtn(ref.get_input_embeddings().weight, fmt))
        if not tied:
            ref.get_output_embeddings().weight.copy_(_rtn(ref.get_output_embeddings().weight, fmt))
        ids = torch.randint(0, ref.config.vocab_size, (2, 9))
        torch.testing.assert_close(got(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_row_blocked_head_equals_one_block(monkeypatch):
    torch.manual_seed(0)
    layer = QuantLinear(16, 50, "nf4", bias=True)
    codes, scales = quantize_rtn(torch.randn(50, 16), FORMATS["nf4"])
    layer.qweight.copy_(pack(codes, FORMATS["nf4"]))
    layer.scales.copy_(scales)
    torch.nn.init.normal_(layer.bias)
    x, g = torch.randn(3, 4, 16), torch.randn(3, 4, 50)
    whole = layer.linear_map(x), layer.transposed_map(g)
    monkeypatch.setitem(quant.ROW_BLOCK_ENTRIES, "cpu", 16 * 7)  # blocks of 7 rows, the last one short
    assert len(layer.row_blocks()) == 8
    torch.testing.assert_close(layer.linear_map(x), whole[0])
    torch.testing.assert_close(layer.transposed_map(g), whole[1])


def test_chunked_loss_through_a_quantised_head_equals_full_logits(untied_base, tiny_data, tmp_path, monkeypatch):
    emu = build_emulator(untied_base, tiny_data, tmp_path / "emu",
                         EmulatorConfig(ratio=0.5, method="quant", samples=16, device="cpu", vocab_format="nf4"))
    model = load_emulator(emu, device="cpu")
    monkeypatch.setitem(quant.ROW_BLOCK_ENTRIES, "cpu", 32 * 5)  # the head in blocks of 5 rows
    tok = load_tokenizer(emu)
    batch = collate(load_examples(tiny_data, tok, 64)[:4], tok.pad_token_id)
    h = model.get_input_embeddings()
    h.register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))  # as PEFT's input hook does for checkpointing
    total, n = answer_nll(model, batch, chunk=3)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    y = batch["labels"][:, 1:]
    keep = y != -100
    want = torch.nn.functional.cross_entropy(logits[keep].float(), y[keep], reduction="sum")
    assert n == int(keep.sum()) and n > 3
    torch.testing.assert_close(total, want, atol=1e-4, rtol=1e-5)


def test_vocab_quantised_emulator_trains_corrects_and_reports_bytes(untied_base, tiny_data, tmp_path):
    emu = build_emulator(untied_base, tiny_data, tmp_path / "emu",
                         EmulatorConfig(ratio=0.3, method="quant", samples=16, device="cpu", vocab_format="nf4"))
    ad = train_adapter(emu, tiny_data, tmp_path / "ad", TrainConfig(steps=2, batch_size=4, rank=2, lr=1e-2, device="cpu",
                                                                      eval_samples=4))
    m = json.loads((ad / "manifest.json").read_text())
    losses = [json.loads(line)["loss"] for line in (ad / "loss_log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(x)) for x in losses + [m["final_loss"]])
    dense = sum(t.numel() * 4 for t in load_file(untied_base / "model.safetensors").values())  # fp32, as trained here
    assert 0 < m["model_bytes"] < 0.2 * dense  # NF4 codes (blocks, embedding, head) counted as held, not as parameters
    fixed = correct_adapter(ad, tmp_path / "fixed", config=CorrectConfig(mode="weighted", device="cpu"))
    keys = load_file(fixed / "adapter_model.safetensors")
    assert keys and all("embed" not in k and "lm_head" not in k for k in keys)  # only block layers carry LoRA
    assert WeightStore(untied_base).get("lm_head.weight").shape[0] > 0  # the base is untouched


def test_vocab_format_refusals(untied_base, tiny_data, tmp_path):
    with pytest.raises(EmlocError, match="vocab-format"):
        EmulatorConfig(vocab_format="int3")
    with pytest.raises(EmlocError, match="vocab-format applies"):
        build_emulator(untied_base, tiny_data, tmp_path / "out", EmulatorConfig(method="layer-drop", vocab_format="nf4"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_plan_counts_the_bytes_the_build_stores(tmp_path, tiny_data, family):
    """`emloc plan --vocab-format nf4` lowers the emulator's weights by exactly what the build's manifest saves."""
    from emloc.plan import PlanConfig, predict

    base = make_model_dir(tmp_path / "base", family)
    emu = build_emulator(base, tiny_data, tmp_path / "emu",
                         EmulatorConfig(ratio=0.5, method="quant", samples=8, device="cpu", vocab_format="nf4"))
    v = json.loads((emu / "manifest.json").read_text())["vocab"]
    kw = dict(device="cuda", dtype="bf16", method="quant", ratios=(1.0, 0.5))
    keep, nf4 = (predict(base, PlanConfig(**kw, vocab_format=f)) for f in ("keep", "nf4"))
    assert keep.training[0.5].parts["weights"] - nf4.training[0.5].parts["weights"] == v["bytes_bf16"] - v["bytes"] > 0
    assert keep.training[1.0].parts == nf4.training[1.0].parts  # the original is not an emulator
    with pytest.raises(EmlocError, match="vocab-format"):
        predict(base, PlanConfig(vocab_format="fp8"))


def test_bench_builds_pass_the_vocab_format_to_emloc_emulators_only(tmp_path):
    from emloc.bench import PRESETS
    from emloc.bench_runner import _Runner

    calls = []
    r = _Runner(tmp_path, PRESETS["bigger-in-budget"])
    r.cli = lambda *args: calls.append(args)  # type: ignore[method-assign]
    r.build("quant", "base", "data", 0.25, 8, "--method", "quant")
    r.build("svd", "base", "data", 0.25, 8)
    r.build("drop", "base", "data", 0.25, 8, "--method", "layer-drop")
    assert [("--vocab-format" in c) for c in calls] == [True, True, False]
    assert all(c[c.index("--vocab-format") + 1] == "nf4" for c in calls[:2])


def test_eval_with_generation_on_a_vocab_quantised_emulator(untied_base, tiny_data, tmp_path):
    """Exact match generates through the quantised embedding and head (with the adapter on top)."""
    from emloc import EvalConfig, evaluate

    emu = build_emulator(untied_base, tiny_data, tmp_path / "emu",
                         EmulatorConfig(ratio=0.5, method="quant", samples=8, device="cpu", vocab_format="int8"))
    ad = train_adapter(emu, tiny_data, tmp_path / "ad", TrainConfig(steps=1, batch_size=4, rank=2, device="cpu", eval_samples=4))
    got = evaluate(emu, tiny_data, ad, tmp_path / "eval.json", EvalConfig(samples=6, device="cpu"))
    assert 0.0 <= got["exact_match"] <= 1.0 and torch.isfinite(torch.tensor(got["loss"]))


def test_bench_vocab_ablation_is_a_row_of_its_own(tiny_base, tmp_path):
    from emloc.bench import BenchConfig, run_bench

    cfg = BenchConfig(base=str(tiny_base), methods=("quant",), vocab_ablations=("nf4",), clamps=(), calibration_sizes=(),
                      plain_svd=False, energy_allocation=False, sequential=False, other_calibration=None, baselines=False)
    report = run_bench(tmp_path / "bench", cfg, report_only=True)
    assert "vocab-nf4" in report["not_run"]["unfinished rows"].split(" (")[0].split(", ")


def test_row_block_size_follows_the_device():
    """On a GPU a quantised weight is rebuilt in larger slices than on cpu (fewer kernels per layer), and
    `predict`'s rebuilt-head term uses the slice size of the device it plans for."""
    from emloc.plan import PlanConfig, predict
    from emloc.quant import ROW_BLOCK_ENTRIES, row_block_entries
    from transformers import Qwen2Config

    assert row_block_entries("cpu") == ROW_BLOCK_ENTRIES["cpu"] < row_block_entries("cuda") == ROW_BLOCK_ENTRIES["cuda"]
    assert row_block_entries("meta") == ROW_BLOCK_ENTRIES["cpu"]  # other devices: cpu's
    cfg = Qwen2Config(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                      num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)
    rebuilt = {dev: predict(cfg, PlanConfig(device=dev, method="quant", vocab_format="nf4", ratios=(0.25,)))
               .training_at(0.25).parts["dequantized layer"] for dev in ("cpu", "cuda")}
    assert rebuilt["cpu"] == 27648 * 5120 * 2  # the largest block linear is larger than a cpu slice of the head
    assert rebuilt["cuda"] == ROW_BLOCK_ENTRIES["cuda"] * 2  # a cuda slice of the 152064 x 5120 head


def test_cached_pair_table_equals_the_codebook():
    fmt = FORMATS["nf4"]
    codes = torch.arange(256, dtype=torch.uint8)[None]  # every byte once: low nibble, then high
    scales = torch.ones(1, 8, dtype=torch.float16)
    levels = fmt.levels(torch.float32)
    want = torch.stack((levels[torch.arange(256) & 15], levels[torch.arange(256) >> 4]), dim=1).reshape(1, -1)
    for _ in range(2):  # the second call reads the cache
        torch.testing.assert_close(dequantize(codes, scales, fmt, 512, torch.float32), want)
