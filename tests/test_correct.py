import json
import math

import pytest
import torch

from emloc import CorrectConfig, EmlocError, correct_adapter, merge_adapter
from emloc.correct import correct_layer, scaling, weighted_correction


def setup(seed=0, m=24, n=32, r=4, k=6):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    w_e = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64) / 3
    a = torch.randn(r, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, r, generator=g, dtype=torch.float64) * 0.1
    return w, w_e, a, b


@pytest.mark.parametrize("s", [1.0, 4.0, 16 / math.sqrt(4), 0.25])
def test_correction_identity_holds_without_clamp(s):
    w, w_e, a, b = setup()
    res = correct_layer(w, w_e, a, b, s, clamp=None)
    p = res.lora_A.T  # (n x r), orthonormal columns
    torch.testing.assert_close(p.T @ p, torch.eye(p.shape[1], dtype=p.dtype), atol=1e-12, rtol=0)
    left = w + s * res.lora_B @ res.lora_A
    right = w @ (torch.eye(w.shape[1], dtype=w.dtype) - p @ p.T) + w_e @ p @ p.T + s * b @ a
    torch.testing.assert_close(left, right, atol=1e-10, rtol=1e-10)
    # inside the LoRA's input subspace, corrected original == trained emulator layer
    x = torch.randn(7, a.shape[0], dtype=w.dtype) @ a
    torch.testing.assert_close(x @ left.T, x @ (w_e + s * b @ a).T, atol=1e-9, rtol=1e-9)
    assert res.clamped == 0


def test_clamp_bounds_each_direction():
    w, w_e, a, b = setup(1)
    s = 2.0
    exact = correct_layer(w, w_e, a, b, s, clamp=None)
    # B' is what B_new would be with no correction: recover it and the applied correction
    p, sig, q = torch.linalg.svd(a.T, full_matrices=False)
    b_prime = (b @ q.T) * sig
    # choose L between the directions' correction/LoRA ratios, so some directions clamp and some not
    ratios = ((b_prime - exact.lora_B).abs().mean(0) / b_prime.abs().mean(0)).sort().values
    L = float(ratios[1:3].mean())
    res = correct_layer(w, w_e, a, b, s, clamp=L)
    applied = b_prime - res.lora_B  # = C_clamped / s
    full = b_prime - exact.lora_B  # = C / s
    bound = L * b_prime.abs().mean(0)
    assert torch.all(applied.abs().mean(0) <= bound * (1 + 1e-9))
    over = full.abs().mean(0) > bound
    assert res.clamped == int(over.sum()) == 2
    torch.testing.assert_close(applied[:, over].abs().mean(0), bound[over])  # scaled to exactly the bound
    torch.testing.assert_close(applied[:, ~over], full[:, ~over])  # others untouched


def test_scaling_handles_alpha_rank_and_rslora():
    assert scaling({"lora_alpha": 16}, "x.q_proj", 8) == 2.0
    assert scaling({"lora_alpha": 16, "use_rslora": True}, "x.q_proj", 4) == 8.0
    assert scaling({"lora_alpha": 16, "alpha_pattern": {"q_proj": 4}}, "m.layers.0.q_proj", 4) == 1.0


def correlated_inputs(n=32, tokens=400, seed=3):
    """Inputs X (tokens x n) with a few strong directions, like real activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 5, generator=g, dtype=torch.float64) @ torch.randn(5, n, generator=g, dtype=torch.float64) * 3
    return x + 0.05 * torch.randn(tokens, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("s", [1.0, 4.0, 0.25])
def test_weighted_residual_is_orthogonal_to_every_lora_feature(s):
    """After the weighted correction, (corrected original - trained emulator) x is G-orthogonal to A x."""
    w, w_e, a, b = setup()
    x = correlated_inputs()
    g = x.T @ x
    res = weighted_correction(w, w_e, a, b, s, g, ridge=0.0)
    torch.testing.assert_close(res.lora_A, a)
    resid = (w + s * res.lora_B @ a) - (w_e + s * b @ a)
    assert float((resid @ g @ a.T).abs().max()) < 1e-8 * float((w - w_e).abs().max() * g.abs().max())


def test_weighted_equals_paper_exact_when_inputs_are_white():
    """With G = I the data metric is the Euclidean one: both corrections give the same W + s B A."""
    w, w_e, a, b = setup(2)
    s = 2.0
    paper = correct_layer(w, w_e, a, b, s, clamp=None)
    weighted = weighted_correction(w, w_e, a, b, s, torch.eye(a.shape[1], dtype=a.dtype), ridge=0.0)
    torch.testing.assert_close(weighted.lora_B @ weighted.lora_A, paper.lora_B @ paper.lora_A, atol=1e-10, rtol=1e-10)


def test_weighted_matches_the_emulator_better_on_the_data_than_paper():
    """On correlated inputs the weighted correction is the least-squares optimum through A: the paper's
    (which spans the same input directions) cannot be closer to the trained emulator layer on the data."""
    w, w_e, a, b = setup(4)
    x = correlated_inputs()
    g = x.T @ x
    s = 2.0
    target = x @ (w_e + s * b @ a).T

    def err(res):
        return float((x @ (w + s * res.lora_B @ res.lora_A).T - target).norm())
    weighted, paper = err(weighted_correction(w, w_e, a, b, s, g, ridge=0.0)), err(correct_layer(w, w_e, a, b, s, clamp=None))
    uncorrected = float((x @ (w + s * b @ a).T - target).norm())
    assert weighted < paper and weighted < uncorrected


def test_auto_keeps_the_candidate_the_original_scores_best(tiny_adapter, tmp_path):
    from safetensors.torch import load_file

    out = correct_adapter(tiny_adapter, tmp_path / "auto", config=CorrectConfig(device="cpu"))
    m = json.loads((out / "manifest.json").read_text())
    scores = m["selection"]
    assert set(scores) == {"none", "weighted", "paper"} and all(math.isfinite(v) for v in scores.values())
    assert m["mode"] == min(scores, key=scores.get) and m["config"]["mode"] == "auto"
    alone = correct_adapter(tiny_adapter, tmp_path / "alone", config=CorrectConfig(mode=m["mode"], device="cpu"))
    got, want = load_file(out / "adapter_model.safetensors"), load_file(alone / "adapter_model.safetensors")
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k])


def test_weighted_mode_needs_its_calibration_data(tiny_adapter, tmp_path):
    with pytest.raises(EmlocError, match="calibration data"):
        correct_adapter(tiny_adapter, tmp_path / "c", config=CorrectConfig(calibration=str(tmp_path / "missing.jsonl")))
    assert not (tmp_path / "c").exists()


def test_weighted_on_a_sequential_emulator_warns(tiny_base, tiny_data, tmp_path, caplog):
    from emloc import EmulatorConfig, TrainConfig, build_emulator, train_adapter

    emu = build_emulator(tiny_base, tiny_data, tmp_path / "emu", EmulatorConfig(ratio=0.5, samples=16, sequential=True, device="cpu", method="svd"))
    ad = train_adapter(emu, tiny_data, tmp_path / "ad", TrainConfig(steps=1, batch_size=2, rank=4, device="cpu"))
    with caplog.at_level("WARNING", logger="emloc"):
        correct_adapter(ad, tmp_path / "paper", config=CorrectConfig(mode="paper", device="cpu"))
        assert "prefer --mode auto" not in caplog.text
        out = correct_adapter(ad, tmp_path / "w", config=CorrectConfig(mode="weighted", device="cpu"))
    assert "--sequential" in caplog.text and "prefer --mode auto" in caplog.text
    assert (out / "adapter_model.safetensors").is_file()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", ["weighted", "paper"])
def test_corrected_adapter_loads_with_plain_peft_and_merges(tiny_base, tiny_emulator, tiny_adapter, tmp_path, mode):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = correct_adapter(tiny_adapter, tmp_path / "corrected", config=CorrectConfig(mode=mode, clamp=None))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_base)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "corrected_adapter" and manifest["clamped_directions"] == 0
    assert all(v["correction_norm"] > 0 for v in manifest["layers"].values())
    ids = torch.tensor([[4, 10, 20, 30, 40, 12]])
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    plain = _logits(base, ids)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out)
    unmerged = _logits(peft_model, ids)
    assert (unmerged - plain).abs().max() > 1e-4  # the adapter does something
    merged_peft = _logits(peft_model.merge_and_unload(), ids)
    torch.testing.assert_close(merged_peft, unmerged, atol=1e-4, rtol=1e-4)
    merged_dir = merge_adapter(None, out, tmp_path / "merged")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(merged_dir), ids), unmerged, atol=1e-4, rtol=1e-4)
    # small output shards: the same model, written in several shards with an index
    sharded = merge_adapter(None, out, tmp_path / "merged-sharded", max_shard_bytes=20_000)
    assert len(list(sharded.glob("*.safetensors"))) > 3
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(sharded), ids), unmerged, atol=1e-4, rtol=1e-4)
    # the input adapter was not modified
    assert json.loads((tiny_adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_emulator)


def test_correction_is_exact_for_an_unchanged_emulator(tmp_path, tiny_base, tiny_data):
    """At ratio 1 every layer stays dense (W_e = W), so the correction must be zero."""
    from emloc import EmulatorConfig, TrainConfig, build_emulator, train_adapter
    from safetensors.torch import load_file

    emu = build_emulator(tiny_base, tiny_data, tmp_path / "emu", EmulatorConfig(ratio=1.0, samples=8, device="cpu"))
    ad = train_adapter(emu, tiny_data, tmp_path / "ad", TrainConfig(steps=2, batch_size=2, lr=1e-2, device="cpu", eval_fraction=0))
    out = correct_adapter(ad, tmp_path / "c", config=CorrectConfig(mode="paper", clamp=None))
    m = json.loads((out / "manifest.json").read_text())
    assert max(v["correction_norm"] for v in m["layers"].values()) < 1e-6
    weighted = json.loads((correct_adapter(ad, tmp_path / "w", config=CorrectConfig(mode="weighted")) / "manifest.json").read_text())
    assert max(v["correction_norm"] for v in weighted["layers"].values()) == 0  # every layer dense: nothing to correct
    a, c = load_file(ad / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    k = next(k for k in a if k.endswith("lora_A.weight"))
    kb = k.replace("lora_A", "lora_B")
    torch.testing.assert_close(c[kb] @ c[k], a[kb] @ a[k], atol=1e-5, rtol=1e-5)


def test_refuses_mismatched_emulator_and_other_adapter_types(tmp_path, tiny_base, tiny_data, tiny_adapter):
    from emloc import EmulatorConfig, build_emulator

    other = build_emulator(tiny_base, tiny_data, tmp_path / "other", EmulatorConfig(ratio=0.3, samples=8, device="cpu"))
    with pytest.raises(EmlocError, match="different emulator"):
        correct_adapter(tiny_adapter, tmp_path / "c1", emulator=other)
    assert not (tmp_path / "c1").exists()
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in tiny_adapter.iterdir():
        (dora / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EmlocError, match="DoRA"):
        correct_adapter(dora, tmp_path / "c2")
    with pytest.raises(EmlocError, match="clamp"):
        correct_adapter(tiny_adapter, tmp_path / "c3", config=CorrectConfig(clamp=-1))


def test_weighted_correction_from_projected_statistics_equals_the_gram_form():
    torch.manual_seed(3)
    m, n, r = 12, 20, 3
    w, w_e = torch.randn(m, n, dtype=torch.float64), torch.randn(m, n, dtype=torch.float64)
    a, b = torch.randn(r, n, dtype=torch.float64), torch.randn(m, r, dtype=torch.float64)
    x = torch.randn(50, n, dtype=torch.float64)
    g = x.T @ x
    full = weighted_correction(w, w_e, a, b, 2.0, g)
    small = weighted_correction(None, None, a, b, 2.0, projected=((w - w_e) @ g @ a.T, a @ g @ a.T))
    torch.testing.assert_close(small.lora_B, full.lora_B)
    torch.testing.assert_close(small.lora_A, full.lora_A)

