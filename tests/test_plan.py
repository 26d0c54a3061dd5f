"""emloc.plan: memory predictions from a config alone (no weights are read or built)."""

from __future__ import annotations

import pytest
import torch

from emloc import EmlocError
from emloc.plan import (CPU_OVERHEAD, DEFAULT_RATIOS, GIB, Plan, PlanConfig, emulator_params, format_plan,
                        layer_ranks, model_shape, parse_size, predict)

from .conftest import TINY, make_data


@pytest.fixture(scope="module")
def big_shape():
    """A Qwen2.5-32B-shaped config (the paper's ~38B-on-24GB class), as a config object only."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                      num_key_value_heads=8, vocab_size=152064)
    return model_shape(cfg)


def _tiny_config():
    from transformers import AutoConfig

    kw = dict(TINY["llama"])
    return AutoConfig.for_model(kw.pop("model_type"), vocab_size=100, max_position_embeddings=128, **kw)


def _best_by_brute_force(plan: Plan) -> float | None:
    fitting = [r for r in plan.training if not plan.shortfall(r)]
    return max(fitting) if fitting else None


def test_big_model_shape_from_config_alone(big_shape, tmp_path):
    assert big_shape.layers == 64 and big_shape.hidden == 5120 and big_shape.kv_dim == 8 * 128
    assert 32.5e9 < big_shape.total_params < 33e9  # Qwen2.5-32B has 32.76 B parameters
    assert len(big_shape.linears) == 64 * 7
    # a folder holding only config.json is enough
    from transformers import Qwen2Config

    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100).save_pretrained(tmp_path)
    small = model_shape(tmp_path)
    assert small.layers == 2 and small.shard_bytes is None


def test_memory_orderings(big_shape):
    plan = predict(big_shape, PlanConfig(method="svd", budget=24 * GIB))
    ratios = sorted(plan.training)
    assert ratios == sorted(DEFAULT_RATIOS)
    totals = [plan.training[r].total for r in ratios]
    assert all(a < b for a, b in zip(totals, totals[1:])), "EMLoC training memory must grow with the ratio"
    params = [plan.training[r].params for r in ratios]
    assert all(a < b for a, b in zip(params, params[1:]))
    assert plan.training[1.0].total == plan.lora_training.total
    assert plan.lora_training.total > plan.inference.total
    assert 55 * GIB < plan.inference.total < 75 * GIB  # bf16 weights alone are ~61 GB
    # gradient checkpointing saves memory; fp32 costs more than bf16
    no_ckpt = predict(big_shape, PlanConfig(method="svd", gradient_checkpointing=False))
    assert no_ckpt.lora_training.total > plan.lora_training.total
    assert predict(big_shape, PlanConfig(method="svd", dtype="fp32")).inference.total > plan.inference.total
    # emloc's chunked answer loss vs full B x T x V logits (152k vocabulary: 2048 x 152064 x 14 bytes)
    full = predict(big_shape, PlanConfig(method="svd", loss_chunk=None)).lora_training
    assert full.parts["logits+loss"] == 2048 * 152064 * 14 > plan.lora_training.parts["backward working set"]


def test_recommendation_is_largest_fitting_ratio(big_shape):
    # default (float64) statistics: the build keeps only the smaller Gram of each layer (5120 x 5120
    # for the 27648-wide down_proj, from its outputs), so an emulator fits where plain LoRA does not
    for stats in ("float64", "float32"):
        plan = predict(big_shape, PlanConfig(method="svd", budget=24 * GIB, stats_dtype=stats))
        rec = plan.recommend()
        assert rec.ratio is not None and rec.ratio < 1, stats
        assert rec.ratio == _best_by_brute_force(plan)
        assert all(e.total <= 24 * GIB for e in plan.stages(rec.ratio) if not e.host)
        assert all(plan.shortfall(r) for r in plan.training if r > rec.ratio)
        assert "train" in plan.shortfall(1.0)
        assert "inference of the original" in rec.message  # 61 GB of weights do not fit 24 GB
    # no n x n Gram of the MLP width anywhere in the build: far below the 27648^2 x 8 = 6.1 GB of one
    build = predict(big_shape, PlanConfig(method="svd")).build[0.5]
    assert build.parts["statistics + decomposition"] < 6 * GIB
    # a budget the build cannot meet is reported as the build's shortfall
    small = predict(big_shape, PlanConfig(method="svd", budget=8 * GIB)).recommend()
    assert small.ratio is None and "build" in small.over and "over" in small.message


def test_recommendation_extremes(big_shape):
    plan = predict(big_shape, PlanConfig(method="svd"))
    assert plan.recommend().ratio is None and "no memory budget" in plan.recommend().message
    assert plan.recommend(budget=10_000 * GIB).ratio == 1.0
    tiny = plan.recommend(budget=GIB)
    assert tiny.ratio is None and tiny.message.startswith("nothing fits 1.00 GB")
    assert {"build", "train"} <= set(tiny.over)
    # host stages are checked only when a host budget is given (cuda), always on cpu
    assert "merge" not in tiny.over
    assert "merge" in plan.recommend(budget=GIB, host_budget=GIB).over
    cpu = predict(big_shape, PlanConfig(method="svd", device="cpu", budget=GIB)).recommend()
    assert "merge" in cpu.over and "correct" in cpu.over


def test_format_plan(big_shape):
    text = format_plan(predict(big_shape, PlanConfig(method="svd", budget=24 * GIB, stats_dtype="float32")))
    assert "| ratio | params | weights | build | train |" in text
    assert text.count("\n| ") == len(DEFAULT_RATIOS) + 1  # header separator excluded, header + rows
    assert " GB |" in text and "recommended ratio" in text
    assert "| yes |" in text and "| no |" in text


def test_emulator_param_counts_match_lowrank_model():
    """Predicted emulator sizes equal those of the model build_emulator makes (LowRankLinear on meta)."""
    from emloc.emulator import _set_module
    from emloc.lowrank import LowRankLinear
    from emloc.models import empty_model

    config = _tiny_config()
    shape = model_shape(config)
    for ratio in (1.0, 0.75, 0.5, 0.25, 0.1):
        model = empty_model(config)
        for (name, m, n), k in zip(shape.linears, layer_ranks(shape, ratio)):
            if k is not None:
                _set_module(model, name, LowRankLinear(n, m, k, model.get_submodule(name).bias is not None, device="meta"))
        built = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        assert emulator_params(shape, ratio) == built, ratio
    assert emulator_params(shape, 1.0) == shape.total_params
    assert all(k is None for k in layer_ranks(shape, 1.0))


def test_lora_params_match_peft():
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from emloc.train import TrainConfig, lora_config

    config = _tiny_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, lora_config(model, TrainConfig(rank=4)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert predict(config, PlanConfig(method="svd", rank=4)).lora_params == trainable


def test_emulator_counts_match_build_emulator_manifest(tiny_base, tmp_path):
    import json

    from emloc import EmulatorConfig, build_emulator

    data = make_data(tmp_path / "calib.jsonl", 4)
    emu = build_emulator(tiny_base, data, tmp_path / "emu", EmulatorConfig(ratio=0.3, samples=2, device="cpu", method="svd"))
    manifest = json.loads((emu / "manifest.json").read_text())
    plan = predict(tiny_base, PlanConfig(method="svd", ratios=(1.0, 0.3)))
    assert plan.training_at(0.3).params == manifest["params"]["emulator"]
    assert plan.training_at(1.0).params == manifest["params"]["base"]
    assert plan.shape.shard_bytes == max(p.stat().st_size for p in tiny_base.glob("*.safetensors"))


def test_cpu_adds_process_overhead():
    config = _tiny_config()
    cpu = predict(config, PlanConfig(method="svd", device="cpu", dtype="fp32"))
    assert cpu.overhead == CPU_OVERHEAD and cpu.inference.parts["runtime"] == CPU_OVERHEAD
    assert "allocator slack" in cpu.lora_training.parts
    assert "allocator slack" not in predict(config, PlanConfig(method="svd", dtype="fp32")).lora_training.parts


@pytest.mark.parametrize("text,expected", [("24GB", 24 * GIB), ("24GiB", 24 * GIB), ("24g", 24 * GIB),
                                           ("512MB", 512 * 2**20), ("1.5T", int(1.5 * 2**40)), ("1000", 1000),
                                           (77, 77)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("kw,match", [(dict(device="tpu"), "device"), (dict(dtype="int8"), "dtype"),
                                      (dict(ratios=(1.5,)), "ratios"), (dict(stats_dtype="half"), "stats"),
                                      (dict(batch=0), "at least 1")])
def test_bad_settings(kw, match):
    with pytest.raises(EmlocError, match=match):
        predict(_tiny_config(), PlanConfig(method="svd", **kw))


def test_bad_inputs(tmp_path):
    with pytest.raises(EmlocError, match="config.json"):
        predict(tmp_path / "missing")
    with pytest.raises(EmlocError, match="understood"):
        parse_size("lots")


def test_logit_softcapping_families_use_full_logits():
    from transformers import Gemma2Config

    cfg = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, vocab_size=100)
    shape = model_shape(cfg)
    assert shape.full_logits and not model_shape(_tiny_config()).full_logits
    plan = predict(shape, PlanConfig(method="svd", batch=2, seq_len=64))
    assert plan.lora_training.parts["logits+loss"] == 2 * 64 * 100 * (2 + 12)


def _small_qwen(tied: bool, dtype: str = "float32"):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=50_000, tie_word_embeddings=tied, dtype=dtype)


def test_vocab_used_lowers_cpu_estimate_only_for_untied_mmapped_embeddings():
    untied, tied = model_shape(_small_qwen(False)), model_shape(_small_qwen(True))
    assert not untied.tied and tied.tied and untied.embedding_rows == 50_000
    base = dict(batch=2, seq_len=64, dtype="fp32", ratios=(1.0, 0.5))
    every = predict(untied, PlanConfig(method="svd", device="cpu", **base))
    some = predict(untied, PlanConfig(method="svd", device="cpu", vocab_used=100, **base))
    row = max(64 * 4, 64 * 2**10)  # each row read maps a 64 KiB fault-around window
    unread = 50_000 * 64 * 4 - 100 * row
    for a, b in [(every.inference, some.inference), (every.lora_training, some.lora_training),
                 (every.training_at(0.5), some.training_at(0.5))]:
        assert a.total - b.total == unread
        assert b.parts["unread embedding rows"] == -unread
    assert some.merge.total == every.merge.total  # merge reads every tensor
    # tied embeddings (the head reads every row), cuda, and a cast from another stored dtype: no change
    for shape, kw in [(tied, dict(device="cpu")), (untied, dict(device="cuda")),
                      (model_shape(_small_qwen(False, "bfloat16")), dict(device="cpu"))]:
        a, b = predict(shape, PlanConfig(method="svd", **kw, **base)), predict(shape, PlanConfig(method="svd", vocab_used=100, **kw, **base))
        assert a.inference.total == b.inference.total and a.lora_training.total == b.lora_training.total
        assert a.build[0.5].total == b.build[0.5].total
    # ... except the emulator, which is always written in its build's compute dtype
    bf = model_shape(_small_qwen(False, "bfloat16"))
    assert predict(bf, PlanConfig(method="svd", device="cpu", vocab_used=100, **base)).training_at(0.5).total < \
        predict(bf, PlanConfig(method="svd", device="cpu", **base)).training_at(0.5).total
    # more ids than rows never adds memory
    assert predict(untied, PlanConfig(method="svd", device="cpu", vocab_used=10**6, **base)).inference.total == every.inference.total


def test_big_model_on_gpu_ignores_vocab_used(big_shape):
    assert not big_shape.tied
    a = predict(big_shape, PlanConfig(method="svd", budget=24 * GIB, stats_dtype="float32"))
    b = predict(big_shape, PlanConfig(method="svd", budget=24 * GIB, stats_dtype="float32", vocab_used=1000))
    assert [e.total for e in a.stages(0.2)] == [e.total for e in b.stages(0.2)]
    assert a.recommend().ratio == b.recommend().ratio


def test_weighted_correction_streams_statistics():
    shape = model_shape(_small_qwen(False))
    cfg = dict(batch=2, seq_len=64, dtype="fp32", device="cpu", ratios=(1.0, 0.5))
    weighted = predict(shape, PlanConfig(method="svd", correction="weighted", **cfg)).correct
    paper = predict(shape, PlanConfig(method="svd", correction="paper", **cfg)).correct
    assert "factors + statistics" in weighted.parts and "tokenizer" in weighted.parts and "tokenizer" not in paper.parts
    assert weighted.total > paper.total
    assert predict(shape, PlanConfig(method="svd", correction="weighted", stats_dtype="float32", **cfg)).correct.total < weighted.total
    # auto also runs the original on the candidates: never below weighted, and it holds the original's weights
    auto = predict(shape, PlanConfig(method="svd", **cfg))
    assert auto.correct.total >= weighted.total
    assert auto.correct.total >= shape.total_params * 4 - 64 * 2**20
    with pytest.raises(EmlocError, match="correction"):
        predict(shape, PlanConfig(method="svd", correction="exact"))


def test_merge_holds_the_largest_tensor_once(big_shape):
    from emloc.merge import MAX_SHARD_BYTES
    from emloc.plan import merge_chunk_bytes

    # the 152k x 5120 bf16 embedding (1.5 GB) is written nearly alone: once, not twice
    assert merge_chunk_bytes(big_shape, 2) == big_shape.largest_tensor * 2 > 2 * MAX_SHARD_BYTES
    # a small model's fullest shard is 256 MiB of merged block linears: read pages + merged copies
    small = model_shape(_tiny_config())
    assert merge_chunk_bytes(small, 4) == max(small.largest_tensor * 4,
                                              2 * min(MAX_SHARD_BYTES, (small.total_params - small.nonblock_params) * 4))


def test_quantised_methods_count_their_stored_bytes(tiny_base):
    """quant at 0.5 stores int8 codes (+ float16 row scales): its weights sit between an SVD emulator at
    0.5 and the original; ratios below NF4 are dropped for quant, below NF4 + a residual for svd+quant."""
    from emloc.emulator import layer_plan
    from emloc.plan import emulator_weight_bytes, model_shape

    shape = model_shape(tiny_base)
    svd = predict(tiny_base, PlanConfig(method="svd", device="cpu", dtype="bf16", ratios=(1.0, 0.5, 0.25, 0.1)))
    quant = predict(tiny_base, PlanConfig(device="cpu", dtype="bf16", method="quant", ratios=(1.0, 0.5, 0.25, 0.1)))
    assert sorted(quant.training) == [0.25, 0.5, 1.0]
    block = sum(layer_plan(m, n, 0.5, "quant")["bytes"] - 2 * m * n for _, m, n in shape.linears)
    assert emulator_weight_bytes(shape, 0.5, "quant", 2) == shape.total_params * 2 + block
    assert quant.training[0.5].parts["weights"] == emulator_weight_bytes(shape, 0.5, "quant", 2)
    assert quant.training[0.5].parts["dequantized layer"] == max(m * n for _, m, n in shape.linears) * 2
    assert svd.training[0.5].parts["weights"] < quant.training[0.5].parts["weights"] < svd.training[1.0].parts["weights"]
    with pytest.raises(EmlocError, match="method"):
        predict(tiny_base, PlanConfig(method="prune"))


def test_quantised_build_counts_every_input_gram_and_gptq_workspace(big_shape):
    """GPTQ keeps each layer's input Gram (down_proj's 27648^2 in float64 here) and factors it: the plan
    counted only the SVD's smaller Grams for every method (a 7B build measured 2.5x its prediction)."""
    quant = predict(big_shape, PlanConfig(method="quant", ratios=(1.0, 0.5), stats_dtype="float64"))
    svd = predict(big_shape, PlanConfig(method="svd", ratios=(1.0, 0.5), stats_dtype="float64"))
    widest = 27648 ** 2 * 8
    # on a GPU the Gram and two more n x n while its inverse is factored
    assert quant.build[0.5].parts["statistics + decomposition"] >= 3 * widest
    assert svd.build[0.5].parts["statistics + decomposition"] < widest
    cpu = predict(big_shape, PlanConfig(method="quant", ratios=(1.0, 0.5), device="cpu", budget=10**15))
    assert 2 * widest <= cpu.build[0.5].parts["statistics + decomposition"] < 3 * widest


def test_plan_says_when_float32_statistics_let_a_larger_ratio_fit(big_shape):
    """At 24 GB the 32B's NF4 build fits only with float32 statistics: the plan says so."""
    plan = predict(big_shape, PlanConfig(budget=24 * GIB))
    rec = plan.recommend()
    assert rec.ratio == 0.2 and "build" in plan.shortfall(0.4)
    text = format_plan(plan)
    assert "With --stats-dtype float32" in text and "ratio 0.4 fits" in text
    assert "--stats-dtype float32" not in format_plan(predict(big_shape, PlanConfig(budget=24 * GIB, stats_dtype="float32")))
