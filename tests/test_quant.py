"""Quantised emulators (`--method quant` / `svd+quant`) and the QLoRA baseline, on tiny models."""

import json

import pytest
import torch
from safetensors.torch import load_file

from emloc import CorrectConfig, EmlocError, EmulatorConfig, TrainConfig, build_emulator, correct_adapter, load_emulator, train_adapter
from emloc.correct import correct_layer, scaling
from emloc.emulator import layer_plan, load_layer
from emloc.models import WeightStore
from emloc.quant import (FORMATS, NF4_LEVELS, QuantLinear, damped_error, dequantize, gptq_factor, pack, quantize_gptq, quantize_rtn,
                         unpack, weighted_error)

from .conftest import TINY, make_model_dir


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
@pytest.mark.parametrize("n", [7, 64, 130])
def test_pack_round_trip_and_dequantized_values_lie_on_the_grid(fmt, n):
    f = FORMATS[fmt]
    torch.manual_seed(0)
    w = torch.randn(5, n)
    codes, scales = quantize_rtn(w, f)
    packed = pack(codes, f)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (n * f.bits + 7) // 8)
    assert torch.equal(unpack(packed, f, n).long(), codes)
    deq = dequantize(packed, scales, f, n, torch.float64)
    g = f.group or n
    for j in range(0, n, g):  # every entry is a level times its group's float16 scale, the nearest one
        s = scales[:, j // g].double()[:, None]
        levels = f.levels(torch.float64)
        on_grid = deq[:, j:j + g] / s
        assert torch.allclose(on_grid, levels[codes[:, j:j + g]], atol=1e-12)
        gap = (levels[1:] - levels[:-1]).max()
        assert ((w[:, j:j + g].double() - deq[:, j:j + g]).abs() <= s * gap / 2 + 1e-3 * s).all()
    if fmt == "nf4":
        assert sorted(set(levels.tolist())) == sorted(NF4_LEVELS)


def test_gptq_with_white_inputs_is_round_to_nearest():
    """With an identity Gram nothing feeds forward (the inverse Hessian is diagonal): GPTQ = RTN exactly."""
    torch.manual_seed(0)
    w = torch.randn(6, 128, dtype=torch.float64)
    for f in FORMATS.values():
        c1, s1 = quantize_rtn(w, f)
        c2, s2 = quantize_gptq(w, torch.eye(128, dtype=torch.float64) * 40, f)
        assert torch.equal(c1, c2) and torch.equal(s1, s2)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_gptq_lowers_the_output_error_on_correlated_inputs(fmt):
    torch.manual_seed(0)
    n = 128
    x = torch.randn(400, 16, dtype=torch.float64) @ torch.randn(16, n, dtype=torch.float64) + 0.05 * torch.randn(400, n, dtype=torch.float64)
    gram = x.T @ x
    w = torch.randn(24, n, dtype=torch.float64)
    f = FORMATS[fmt]
    errs = {}
    for name, (c, s) in {"rtn": quantize_rtn(w, f), "gptq": quantize_gptq(w, gram, f)}.items():
        errs[name] = weighted_error(w, dequantize(pack(c, f), s, f, n, torch.float64), gram)
    assert errs["gptq"] < 0.7 * errs["rtn"], errs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_error_from_the_gptq_factor_equals_the_error_from_the_gram(dtype):
    """The build measures GPTQ layers from the factor (the Gram's memory is reused): same number."""
    torch.manual_seed(0)
    n = 96
    x = torch.randn(300, 12, dtype=torch.float64) @ torch.randn(12, n, dtype=torch.float64) + 0.05 * torch.randn(300, n, dtype=torch.float64)
    x[:, [3, 40]] = 0.0  # inputs never seen: zero rows and columns of the Gram
    gram = (x.T @ x).to(dtype)
    w = torch.randn(20, n, dtype=torch.float64)
    f = FORMATS["nf4"]
    c, s = quantize_gptq(w, gram, f)
    w_e = dequantize(pack(c, f), s, f, n, torch.float64)
    factor = gptq_factor(gram.clone(), overwrite=True)
    assert torch.equal(quantize_gptq(w, factor, f)[0], c)  # the factor gives the same codes
    expected = weighted_error(w, w_e, gram)
    assert damped_error(w, w_e, factor) == pytest.approx(expected, rel=1e-9 if dtype == torch.float64 else 1e-3)
    assert damped_error(w, w, factor) == pytest.approx(0.0, abs=1e-12)


def test_gptq_factor_overwrites_only_when_told():
    torch.manual_seed(0)
    x = torch.randn(50, 8, dtype=torch.float64)
    gram = x.T @ x
    kept = gram.clone()
    gptq_factor(gram)
    assert torch.equal(gram, kept)
    gptq_factor(gram, overwrite=True)
    assert not torch.equal(gram, kept)


def random_quant_linear(m: int, n: int, k: int, dtype: torch.dtype) -> QuantLinear:
    """An NF4 `QuantLinear` (m x n, low-rank term of rank k, bias) with random codes and factors."""
    f = FORMATS["nf4"]
    layer = QuantLinear(n, m, "nf4", rank=k, bias=True, dtype=dtype)
    codes, scales = quantize_rtn(torch.randn(m, n), f)
    with torch.no_grad():
        layer.qweight.copy_(pack(codes, f))
        layer.scales.copy_(scales)
        layer.up.copy_(torch.randn(m, k))
        layer.down.copy_(torch.randn(k, n))
        layer.bias.copy_(torch.randn(m))
    return layer


def test_quant_linear_forward_backward_and_bytes():
    torch.manual_seed(0)
    m, n, k = 24, 128, 3
    f = FORMATS["nf4"]
    layer = random_quant_linear(m, n, k, torch.float64)
    dense = layer.dense_weight(torch.float64)
    x = torch.randn(2, 5, n, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, x @ dense.T + layer.bias)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g @ dense)
    # no dense float copy is stored: the codes and scales are the layer's weight bytes
    floats = [t for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point() and t.numel() >= m * n]
    assert not floats
    assert layer.qweight.numel() * 1 + layer.scales.numel() * 2 == f.nbytes(m, n)
    assert not any(p.requires_grad for p in (layer.up, layer.down))


def test_layer_plan_bytes_and_unreachable_ratios():
    assert layer_plan(896, 896, 0.5, "quant")["format"] == "int8"
    p = layer_plan(896, 896, 0.3, "quant")
    assert p["format"] == "nf4" and p["rank"] == 0 and p["bytes"] / (2 * 896 * 896) == pytest.approx(4.25 / 16)
    h = layer_plan(896, 4864, 0.5, "svd+quant")
    assert h["format"] == "nf4" and h["rank"] > 0 and 0.49 < h["bytes"] / (2 * 896 * 4864) <= 0.5
    s = layer_plan(896, 896, 0.5, "svd")
    assert s["kind"] == "lowrank" and s["bytes"] == 2 * s["rank"] * 2 * 896
    with pytest.raises(EmlocError, match="low-rank term"):
        layer_plan(896, 896, 0.25, "svd+quant")
    with pytest.raises(EmlocError, match="4-bit"):
        layer_plan(896, 896, 0.2, "quant")
    assert layer_plan(896, 896, 1.0, "quant")["rank"] is None  # ratio 1 keeps the layer dense


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory):
    """A tiny Llama whose widths are multiples of NF4's group (and of bitsandbytes' block) of 64."""
    saved = dict(TINY["llama"])
    TINY["llama"].update(hidden_size=64, intermediate_size=128)
    try:
        return make_model_dir(tmp_path_factory.mktemp("wide") / "base")
    finally:
        TINY["llama"].clear()
        TINY["llama"].update(saved)


@pytest.mark.parametrize("method,ratio", [("quant", 0.5), ("quant", 0.3), ("svd+quant", 0.5)])
def test_quant_emulator_builds_trains_and_corrects(wide_base, tiny_data, tmp_path, method, ratio):
    emu = build_emulator(wide_base, tiny_data, tmp_path / "emu", EmulatorConfig(ratio=ratio, method=method, samples=16, device="cpu"))
    m = json.loads((emu / "manifest.json").read_text())
    assert m["bytes"]["fraction"] <= ratio + 0.02  # int8's float16 row scales: 2 / 64 of a bfloat16 layer here
    model = load_emulator(emu, device="cpu")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.fmt.name == m["layers"]["model.layers.0.self_attn.q_proj"]["format"]
    assert all(0 <= v["rel_error"] < (0.01 if ratio == 0.5 and method == "quant" else 0.1) for v in m["layers"].values())
    ad = train_adapter(emu, tiny_data, tmp_path / "ad", TrainConfig(steps=2, batch_size=4, rank=2, lr=1e-2, device="cpu", eval_samples=4))
    fixed = correct_adapter(ad, tmp_path / "fixed", config=CorrectConfig(mode="paper", clamp=None, device="cpu"))
    # the paper's correction of a quantised emulator uses W_e as the emulator computes it
    name = "model.layers.1.mlp.down_proj"
    layer = load_layer(WeightStore(emu), name, m["layers"][name], torch.device("cpu"), torch.float32)
    a, b = (load_file(ad / "adapter_model.safetensors")[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    w = WeightStore(wide_base).get(name + ".weight").float()
    want = correct_layer(w, layer.dense_weight(torch.float32), a, b, scaling(cfg, name, a.shape[0]), None)
    got = load_file(fixed / "adapter_model.safetensors")
    torch.testing.assert_close(got[f"base_model.model.{name}.lora_B.weight"], want.lora_B)
    correct_adapter(ad, tmp_path / "weighted", config=CorrectConfig(mode="weighted", device="cpu"))


def test_build_refuses_bad_quant_settings_before_reading(tiny_data, tmp_path):
    for kw, match in ((dict(method="quant", rounding="floor"), "rounding"),
                      (dict(method="quant", quant_format="int3"), "format"),
                      (dict(method="magic"), "method"),
                      (dict(method="quant", allocation="energy"), "svd only")):
        with pytest.raises(EmlocError, match=match):  # most fail when the config is made, the rest in build
            build_emulator(tmp_path / "no-such-base", tiny_data, tmp_path / "out", EmulatorConfig(**kw))
    assert not (tmp_path / "out").exists()


def test_qlora_trains_on_nf4_and_its_adapter_loads_on_the_original(wide_base, tiny_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    from emloc import EvalConfig, evaluate

    ad = train_adapter(wide_base, tiny_data, tmp_path / "q", TrainConfig(steps=2, batch_size=4, rank=2, device="cpu",
                                                                         eval_samples=4, quantize="nf4"))
    plain = train_adapter(wide_base, tiny_data, tmp_path / "p", TrainConfig(steps=1, batch_size=4, rank=2, device="cpu", eval_samples=4))
    q, p = load_file(ad / "adapter_model.safetensors"), load_file(plain / "adapter_model.safetensors")
    assert q.keys() == p.keys() and all(q[k].shape == p[k].shape for k in q)
    on_original = evaluate(wide_base, tiny_data, ad, config=EvalConfig(samples=4, device="cpu", exact_match=False))
    on_nf4 = evaluate(wide_base, tiny_data, ad, config=EvalConfig(samples=4, device="cpu", exact_match=False, quantize="nf4"))
    assert on_original["nll"] != on_nf4["nll"]  # the NF4 copy is a different model
    with pytest.raises(EmlocError, match="not to an emulator"):
        emu = build_emulator(wide_base, tiny_data, tmp_path / "emu", EmulatorConfig(ratio=0.5, samples=4, device="cpu"))
        train_adapter(emu, tiny_data, tmp_path / "x", TrainConfig(steps=1, device="cpu", quantize="nf4"))


def test_refining_the_last_blocks_keeps_the_others_and_starts_from_the_adapter(tiny_base, tiny_data, tiny_adapter, tmp_path):
    """--init-adapter + --last-blocks: the LoRA of earlier blocks is the initial adapter's, bit for bit; the last block's moves."""
    out = train_adapter(tiny_base, tiny_data, tmp_path / "refined", TrainConfig(steps=2, batch_size=4, lr=5e-2, device="cpu",
                                                                                init_adapter=str(tiny_adapter), last_blocks=1,
                                                                                eval_samples=4))
    before, after = load_file(tiny_adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(".layers.1." in k for k in moved)
    assert json.loads((out / "manifest.json").read_text())["trainable_params"] == sum(v.numel() for k, v in before.items() if ".layers.1." in k)
    with pytest.raises(EmlocError, match="last-blocks"):
        train_adapter(tiny_base, tiny_data, tmp_path / "x", TrainConfig(steps=1, device="cpu", last_blocks=3))


def test_auto_method_is_quant_from_a_quarter_of_the_bytes_and_svd_below(tiny_base, tiny_data, tmp_path):
    from emloc.emulator import resolve_method

    assert resolve_method("auto", [0.5]) == "quant" and resolve_method("auto", [0.25, None, 1.0]) == "quant"
    assert resolve_method("auto", [0.5, 0.2]) == "svd" and resolve_method("svd", [0.5]) == "svd"
    emu = build_emulator(tiny_base, tiny_data, tmp_path / "q", EmulatorConfig(ratio=0.5, samples=4, device="cpu"))
    assert json.loads((emu / "manifest.json").read_text())["config"]["method"] == "quant"
    emu = build_emulator(tiny_base, tiny_data, tmp_path / "s", EmulatorConfig(ratio=0.2, samples=4, device="cpu"))
    assert json.loads((emu / "manifest.json").read_text())["config"]["method"] == "svd"
    emu = build_emulator(tiny_base, tiny_data, tmp_path / "e", EmulatorConfig(ratio=0.5, samples=4, device="cpu", allocation="energy"))
    assert json.loads((emu / "manifest.json").read_text())["config"]["method"] == "svd"  # an SVD-only option asks for SVD
