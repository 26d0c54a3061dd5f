import pytest
import torch
from torch import nn

from emloc.lowrank import (
    LowRankLinear,
    factorize,
    rank_for_ratio,
    saves_parameters,
    whitening_factor,
)


def correlated_inputs(tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 4, generator=g, dtype=torch.float64)
    mix = torch.randn(4, n, generator=g, dtype=torch.float64)
    scales = torch.logspace(1, -2, n, dtype=torch.float64)
    return latent @ mix + 0.05 * torch.randn(tokens, n, generator=g, dtype=torch.float64) * scales


def out_err(w, we, x):
    return float(torch.linalg.norm(x @ (w - we).T))


def test_whitened_svd_beats_plain_svd_on_correlated_inputs():
    torch.manual_seed(0)
    w = torch.randn(24, 32, dtype=torch.float64)
    x = correlated_inputs(512, 32)
    g = x.T @ x
    for k in (2, 4, 8):
        white = factorize(w, g, k)
        plain = factorize(w, None, k)
        e_white = out_err(w, white.up @ white.down, x)
        e_plain = out_err(w, plain.up @ plain.down, x)
        assert e_white < e_plain, (k, e_white, e_plain)
        if k >= 4:  # the inputs live near a 4-dim subspace: whitening captures it, plain SVD does not
            assert e_white < 0.1 * e_plain, (k, e_white, e_plain)
        # the reported relative error is the measured one
        rel = e_white**2 / float(torch.linalg.norm(x @ w.T)) ** 2
        assert white.rel_error == pytest.approx(rel, rel=1e-6, abs=1e-12)


def test_full_rank_reconstructs_weight():
    torch.manual_seed(1)
    w = torch.randn(12, 20, dtype=torch.float64)
    x = torch.randn(200, 20, dtype=torch.float64)
    f = factorize(w, x.T @ x, 12)
    torch.testing.assert_close(f.up @ f.down, w, atol=1e-9, rtol=1e-9)
    assert f.rel_error < 1e-20


def test_whitening_factor_is_a_square_root_and_inverse_without_general_inverse():
    x = torch.randn(100, 16, dtype=torch.float64)
    g = x.T @ x
    s, s_inv = whitening_factor(g)
    lam = 1e-7 * float(torch.trace(g)) / 16  # the floor: lambda = EIG_FLOOR x mean eigenvalue, added to G
    torch.testing.assert_close(s @ s.T, g + lam * torch.eye(16, dtype=torch.float64), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(s_inv @ s, torch.eye(16, dtype=torch.float64), atol=1e-9, rtol=1e-9)


def test_rank_deficient_statistics_stay_finite():
    x = torch.randn(3, 16, dtype=torch.float64)  # 3 tokens, 16 features: G has rank 3
    f = factorize(torch.randn(8, 16, dtype=torch.float64), x.T @ x, 4)
    assert torch.isfinite(f.up).all() and torch.isfinite(f.down).all()


@pytest.mark.parametrize("m,n,ratio,k", [(576, 1536, 0.5, 208), (576, 576, 0.5, 144), (576, 192, 0.25, 32), (10, 10, 0.01, 1),
                                         (18944, 3584, 0.5, 1504), (30, 30, 0.25, 3)])
def test_rank_follows_ratio_formula(m, n, ratio, k):
    """floor(ratio m n / (m + n)) rounded down to a multiple of 8 (GPU tensor cores); below 8 kept."""
    assert rank_for_ratio(m, n, ratio) == k
    assert k * (m + n) <= ratio * m * n or k == 1


def test_saves_parameters():
    assert saves_parameters(576, 576, 287)
    assert not saves_parameters(576, 576, 288)  # ratio 1 keeps the layer dense


def test_lowrank_linear_is_a_linear_that_peft_wraps_with_original_shapes():
    from peft import LoraConfig, get_peft_model

    layer = LowRankLinear(20, 12, 3, bias=True)
    for p in (layer.up, layer.down, layer.bias):
        nn.init.normal_(p)
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + layer.bias)
    assert isinstance(layer, nn.Linear) and "weight" not in layer._parameters  # no dense weight stored
    net = nn.Sequential()
    net.add_module("proj", layer)
    peft = get_peft_model(net, LoraConfig(r=2, target_modules=["proj"]))
    lora = peft.base_model.model.proj
    assert lora.lora_A["default"].weight.shape == (2, 20)
    assert lora.lora_B["default"].weight.shape == (12, 2)
    torch.testing.assert_close(peft(x), layer(x))  # B starts at zero


def test_allocate_ranks_spends_the_budget_where_the_spectrum_is_flat():
    from emloc.lowrank import allocate_ranks

    shapes = {"steep": (64, 64), "flat": (64, 64)}
    energy = {"steep": 0.5 ** torch.arange(64, dtype=torch.float64), "flat": torch.ones(64, dtype=torch.float64)}
    budget = 2 * 16 * 128  # uniform rank 16 each
    ranks = allocate_ranks(energy, shapes, budget)
    assert sum(k * 128 for k in ranks.values()) <= budget
    assert ranks["flat"] > 16 > ranks["steep"] >= 1
    # the summed relative error beats the uniform split
    rel = {k: (e / e.sum()) for k, e in energy.items()}
    assert sum(float(rel[k][ranks[k]:].sum()) for k in ranks) < sum(float(rel[k][16:].sum()) for k in ranks)
    # equal spectra and shapes: an even split; ranks never exceed what still saves parameters
    even = allocate_ranks({"a": torch.ones(64), "b": torch.ones(64)}, {"a": (64, 64), "b": (64, 64)}, budget)
    assert even == {"a": 16, "b": 16}
    capped = allocate_ranks({"a": torch.ones(64)}, {"a": (64, 64)}, 10**9)
    assert saves_parameters(64, 64, capped["a"]) and not saves_parameters(64, 64, capped["a"] + 1)


def test_spectrum_energy_is_the_factorization_error_spectrum():
    """The energy allocation spends rank by these values: dropping direction j costs energy_j."""
    from emloc.lowrank import output_spectrum

    torch.manual_seed(0)
    w = torch.randn(24, 32, dtype=torch.float64)
    x = correlated_inputs(200, 32).double()
    g, y = x.T @ x, x @ w.T
    sp = output_spectrum(w, y.T @ y, torch.trace(g))
    e = sp.energy
    for k in (1, 5, 20):
        assert factorize(w, g, k).rel_error == pytest.approx(float(e[k:].sum() / e.sum()), rel=1e-4, abs=1e-8)  # floor share
        assert sp.factors(k).rel_error == pytest.approx(factorize(w, g, k).rel_error, rel=1e-9)


@pytest.mark.parametrize("shape", [(24, 40), (32, 32), (48, 20)])
@pytest.mark.parametrize("tokens", [400, 6])  # 6 tokens: G is rank-deficient and the floor decides the ties
def test_spectra_give_the_reference_factorization(shape, tokens):
    """Output side (m <= n: eigh of W G W^T) and input side (m > n: shared eigh of G, SVD of W S) give
    the same W_e and relative error as the reference whitened SVD of W S, for every rank."""
    from emloc.lowrank import input_eigh, input_spectrum, output_spectrum

    m, n = shape
    torch.manual_seed(m + tokens)
    w = torch.randn(m, n, dtype=torch.float64)
    x = correlated_inputs(tokens, n, seed=tokens)
    g = x.T @ x
    y = x @ w.T
    spectra = {"output": output_spectrum(w, y.T @ y, torch.trace(g)), "input": input_spectrum(w, input_eigh(g))}
    scale = float(torch.linalg.norm(w))
    for k in (1, min(m, n) // 3, min(m, n) - 1):
        ref = factorize(w, g, k)
        for side, sp in spectra.items():
            f = sp.factors(k)
            torch.testing.assert_close(f.up @ f.down, ref.up @ ref.down, atol=1e-7 * scale, rtol=0, msg=f"{side} k={k}")
            assert f.rel_error == pytest.approx(ref.rel_error, rel=1e-6, abs=1e-12), (side, k)
            # the split of the singular values between the factors is the reference's (up to signs)
            torch.testing.assert_close(f.up.norm(dim=0), ref.up.norm(dim=0), atol=1e-6 * scale, rtol=1e-6)


def test_spectrum_of_a_weight_with_zero_rows_is_finite():
    from emloc.lowrank import output_spectrum

    w = torch.randn(8, 16, dtype=torch.float64)
    w[5:] = 0  # rank 5: energies beyond it are zero
    x = torch.randn(50, 16, dtype=torch.float64)
    y = x @ w.T
    f = output_spectrum(w, y.T @ y, torch.trace(x.T @ x)).factors(7)
    assert torch.isfinite(f.up).all() and torch.isfinite(f.down).all()
    torch.testing.assert_close(f.up @ f.down, w, atol=1e-9, rtol=0)
