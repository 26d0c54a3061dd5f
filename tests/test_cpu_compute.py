"""Frozen bf16 products in float32 on CPUs without bf16 units (`emloc.cpu_compute`)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from emloc import EmlocError
from emloc.cpu_compute import UpcastLinear, bf16_units_in, compute_dtype, frozen_linear, upcast_frozen_linears
from emloc.lowrank import LowRankLinear
from emloc.train import load_model

from .test_quant import random_quant_linear

BF16 = torch.bfloat16


@pytest.fixture
def upcast(monkeypatch):
    monkeypatch.setenv("EMLOC_CPU_MATMUL", "float32")


def saved_for_backward(fn):
    """Run fn() and return the tensors autograd saved for the backward pass (dtype, shape)."""
    saved = []

    def pack_hook(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        out = fn()
    return out, saved


def test_cpu_flags_decide_and_the_environment_overrides(monkeypatch):
    assert not bf16_units_in("flags\t: fpu sse avx2 fma\n", "x86_64")
    assert bf16_units_in("flags\t: avx2 avx512f avx512_bf16\n", "x86_64")
    assert bf16_units_in("flags\t: avx2 amx_bf16 amx_tile\n", "x86_64")
    assert bf16_units_in("Features\t: fp asimd bf16 i8mm\n", "aarch64")
    assert not bf16_units_in("Features\t: fp asimd\n", "aarch64")
    assert bf16_units_in("", "x86_64")  # nothing to go on: leave torch alone
    monkeypatch.setenv("EMLOC_CPU_MATMUL", "native")
    assert compute_dtype(BF16, "cpu") == BF16
    monkeypatch.setenv("EMLOC_CPU_MATMUL", "float32")
    assert compute_dtype(BF16, "cpu") == torch.float32
    assert compute_dtype(torch.float32, "cpu") == torch.float32
    assert compute_dtype(BF16, "meta") == BF16  # only CPU products are rerouted
    monkeypatch.setenv("EMLOC_CPU_MATMUL", "fast")
    with pytest.raises(EmlocError, match="EMLOC_CPU_MATMUL"):
        compute_dtype(BF16, "cpu")


def test_frozen_linear_is_the_float32_product_and_saves_no_float32_weight(upcast):
    torch.manual_seed(0)
    w, b = torch.randn(48, 64).to(BF16), torch.randn(48).to(BF16)
    x = torch.randn(3, 5, 64).to(BF16).requires_grad_()
    y, saved = saved_for_backward(lambda: frozen_linear(x, w, b))
    assert y.dtype == BF16
    assert torch.equal(y, F.linear(x.float(), w.float(), b.float()).to(BF16))
    assert (torch.float32, (48, 64)) not in saved and (BF16, (48, 64)) in saved
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert gx.dtype == BF16 and torch.equal(gx, (g.float() @ w.float()).to(BF16))
    native = F.linear(x, w, b)  # PyTorch's bf16 kernel: float32 accumulation, so within bf16 rounding
    torch.testing.assert_close(y, native, atol=0.05, rtol=0.02)
    # a trainable weight keeps PyTorch's product and its gradient
    wt = w.clone().requires_grad_()
    assert frozen_linear(x, wt).grad_fn is not None and torch.autograd.grad(frozen_linear(x, wt).sum(), wt)[0].shape == w.shape


def test_quant_and_lowrank_layers_compute_in_float32_without_float32_weights(upcast):
    torch.manual_seed(0)
    m, n, k = 24, 128, 3
    q = random_quant_linear(m, n, k, BF16)
    x = torch.randn(2, 5, n).to(BF16).requires_grad_()
    y, saved = saved_for_backward(lambda: q(x))
    low = F.linear(x.float(), q.down.float()).to(BF16).float()
    ref = (F.linear(x.float(), q.quantized(BF16).float()) + F.linear(low, q.up.float())).to(BF16) + q.bias
    assert y.dtype == BF16 and torch.equal(y, ref)
    assert not [s for s in saved if s[1] in ((m, n), (n, m))]
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(gx.float(), torch.ones(2, 5, m) @ q.dense_weight(torch.float32), atol=0.1, rtol=0.02)

    lr = LowRankLinear(n, m, k, bias=True, dtype=BF16)
    with torch.no_grad():
        for p in lr.parameters():
            p.copy_(torch.randn_like(p, dtype=torch.float32))
    lr.requires_grad_(False)
    y, saved = saved_for_backward(lambda: lr(x))
    ref = F.linear(F.linear(x.float(), lr.down.float()).to(BF16).float(), lr.up.float(), lr.bias.float()).to(BF16)
    assert torch.equal(y, ref)
    assert all(dt == BF16 for dt, _ in saved)


def test_loaded_bf16_model_reroutes_only_plain_frozen_linears_and_matches_native(tiny_base, monkeypatch):
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    monkeypatch.setenv("EMLOC_CPU_MATMUL", "native")
    native = load_model(tiny_base, "cpu", "bfloat16")
    assert not [m for m in native.modules() if isinstance(m, UpcastLinear)]
    monkeypatch.setenv("EMLOC_CPU_MATMUL", "float32")
    model = load_model(tiny_base, "cpu", "bfloat16")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is UpcastLinear for m in linears)
    assert model.state_dict().keys() == native.state_dict().keys()
    assert all(p.dtype == BF16 for p in model.parameters())
    with torch.no_grad():
        a, b = model(ids).logits.float(), native(ids).logits.float()
    torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)
    assert upcast_frozen_linears(load_model(tiny_base, "cpu", "float32")) == 0  # float32 models are left alone


def test_lora_on_an_upcast_base_trains_its_own_weights(tiny_base, upcast):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_base, "cpu", "bfloat16"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)
    assert not [p for p in model.parameters() if not p.requires_grad and p.grad is not None]
