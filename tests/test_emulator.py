import json

import pytest
import torch

from emloc import EmlocError, EmulatorConfig, LowRankLinear, TrainConfig, build_emulator, correct_adapter, load_emulator, train_adapter
from emloc.lowrank import rank_for_ratio

from .conftest import TINY, make_data, make_model_dir


def test_emulator_manifest_and_ranks(tiny_base, tiny_emulator):
    m = json.loads((tiny_emulator / "manifest.json").read_text())
    assert m["kind"] == "emulator" and m["base"] == str(tiny_base)
    assert m["calibration"]["samples"] == 32 and m["calibration"]["tokens"] > 0
    assert m["params"]["emulator"] < m["params"]["base"]
    assert len(m["layers"]) == 2 * 7
    for name, layer in m["layers"].items():
        if layer["rank"] is not None:
            assert layer["rank"] == rank_for_ratio(layer["out_features"], layer["in_features"], 0.5)
            assert 0 <= layer["rel_error"] < 1
    model = load_emulator(tiny_emulator, device="cpu")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and q.rank == m["layers"]["model.layers.0.self_attn.q_proj"]["rank"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied weights stay tied
    logits = model(input_ids=torch.tensor([[4, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def test_dense_emulator_reproduces_base(tiny_base, tiny_data, tmp_path):
    from transformers import AutoModelForCausalLM

    emu = build_emulator(tiny_base, tiny_data, tmp_path / "e", EmulatorConfig(ratio=1.0, samples=4, device="cpu"))
    ids = torch.tensor([[4, 10, 20, 30]])
    with torch.no_grad():
        a = load_emulator(emu, device="cpu")(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(tiny_base)(input_ids=ids).logits
    torch.testing.assert_close(a, b)


def test_ratio_table_first_match_wins_and_skip(tiny_base, tiny_data, tmp_path):
    from emloc import parse_ratio_table

    table = tmp_path / "ratios.yaml"
    table.write_text("- ['layers\\.1\\.mlp\\.down_proj', skip]\n- ['mlp', 0.25]\n- ['.*', 0.75]\n")
    rules = parse_ratio_table(table)
    emu = build_emulator(tiny_base, tiny_data, tmp_path / "e", EmulatorConfig(ratio=rules, samples=8, device="cpu"))
    layers = json.loads((emu / "manifest.json").read_text())["layers"]
    assert layers["model.layers.1.mlp.down_proj"]["rank"] is None
    assert layers["model.layers.0.mlp.down_proj"]["ratio"] == 0.25
    assert layers["model.layers.0.self_attn.q_proj"]["ratio"] == 0.75


def test_sequential_calibration_differs(tiny_base, tiny_data, tmp_path, tiny_emulator):
    emu = build_emulator(tiny_base, tiny_data, tmp_path / "seq", EmulatorConfig(ratio=0.5, samples=32, sequential=True, device="cpu", method="svd"))
    a = json.loads((emu / "manifest.json").read_text())["layers"]
    b = json.loads((tiny_emulator / "manifest.json").read_text())["layers"]
    assert a["model.layers.0.self_attn.q_proj"]["rel_error"] == pytest.approx(b["model.layers.0.self_attn.q_proj"]["rel_error"])
    assert a["model.layers.1.self_attn.q_proj"]["rel_error"] != pytest.approx(b["model.layers.1.self_attn.q_proj"]["rel_error"])


@pytest.mark.parametrize("bad,match", [(0.0, "outside"), (1.5, "outside"), ([("nothing_matches_this", 0.5)], "matches no layer"),
                                       ([("(", 0.5)], "regular expression")])
def test_bad_ratios(tiny_base, tiny_data, tmp_path, bad, match):
    with pytest.raises(EmlocError, match=match):
        build_emulator(tiny_base, tiny_data, tmp_path / "e", EmulatorConfig(ratio=bad, samples=4, device="cpu"))
    assert not (tmp_path / "e").exists()


def test_refuses_non_empty_output_unless_overwrite(tiny_base, tiny_data, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(EmlocError, match="not empty"):
        build_emulator(tiny_base, tiny_data, out, EmulatorConfig(samples=4, device="cpu"))
    assert (out / "keep.txt").read_text() == "user file"
    build_emulator(tiny_base, tiny_data, out, EmulatorConfig(samples=4, device="cpu"), overwrite=True)
    assert (out / "manifest.json").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temporary folder left behind


def test_few_tokens_warn_and_token_target(tiny_base, tiny_data, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="emloc"):
        emu = build_emulator(tiny_base, tiny_data, tmp_path / "e", EmulatorConfig(samples=2, device="cpu"))
    assert "rank-deficient" in caplog.text
    m = json.loads((emu / "manifest.json").read_text())["calibration"]
    assert m["samples"] == 2 and m["tokens"] < m["widest_layer_input"]
    emu2 = build_emulator(tiny_base, tiny_data, tmp_path / "e2", EmulatorConfig(samples=2, calibration_tokens=200, device="cpu"))
    m2 = json.loads((emu2 / "manifest.json").read_text())["calibration"]
    assert m2["tokens"] >= 200 and m2["samples"] > 2


def test_fewer_records_than_asked_uses_all_and_says_so(tiny_base, tmp_path, caplog):
    data = make_data(tmp_path / "small.jsonl", 5)
    with caplog.at_level("WARNING", logger="emloc"):
        emu = build_emulator(tiny_base, data, tmp_path / "e", EmulatorConfig(samples=64, device="cpu"))
    assert "holds only 5" in caplog.text
    assert json.loads((emu / "manifest.json").read_text())["calibration"]["samples"] == 5


def test_non_finite_weights_are_refused(tmp_path, tiny_data):
    from safetensors.torch import load_file, save_file

    base = make_model_dir(tmp_path / "nan-model", "llama")
    f = base / "model.safetensors"
    t = load_file(f)
    t["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(EmlocError, match="non-finite"):
        build_emulator(base, tiny_data, tmp_path / "e", EmulatorConfig(samples=4, device="cpu"))


@pytest.mark.parametrize("family", sorted(set(TINY) - {"llama"}))
def test_other_architectures_work_unchanged(family, tmp_path, tiny_data):
    """Build, train, correct on families the code never names."""
    base = make_model_dir(tmp_path / family, family)
    emu = build_emulator(base, tiny_data, tmp_path / "emu", EmulatorConfig(ratio=0.5, samples=16, device="cpu", method="svd"))
    layers = json.loads((emu / "manifest.json").read_text())["layers"]
    assert any(v["rank"] is not None for v in layers.values())
    model = load_emulator(emu, device="cpu")
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    ad = train_adapter(emu, tiny_data, tmp_path / "ad", TrainConfig(steps=2, batch_size=2, rank=2, device="cpu", eval_fraction=0))
    out = correct_adapter(ad, tmp_path / "c")
    assert json.loads((out / "manifest.json").read_text())["directions"] == 2 * len(layers)


def test_energy_allocation_keeps_each_block_budget_and_lowers_its_error(tiny_base, tiny_data, tmp_path, tiny_emulator):
    emu = build_emulator(tiny_base, tiny_data, tmp_path / "energy",
                         EmulatorConfig(ratio=0.5, samples=32, allocation="energy", device="cpu"))
    m = json.loads((emu / "manifest.json").read_text())
    u = json.loads((tiny_emulator / "manifest.json").read_text())
    for b in (0, 1):
        mine = {k: v for k, v in m["layers"].items() if f"layers.{b}." in k}
        ref = {k: v for k, v in u["layers"].items() if f"layers.{b}." in k}
        assert sum(v["params_after"] for v in mine.values()) <= sum(v["params_after"] for v in ref.values())
        assert sum(v["rel_error"] for v in mine.values()) < sum(v["rel_error"] for v in ref.values())
    assert any(m["layers"][k]["rank"] != u["layers"][k]["rank"] for k in m["layers"])
    model = load_emulator(emu, device="cpu")  # ranks come from the manifest
    q = model.model.layers[0].self_attn.q_proj
    assert q.rank == m["layers"]["model.layers.0.self_attn.q_proj"]["rank"]
    with pytest.raises(EmlocError, match="allocation"):
        build_emulator(tiny_base, tiny_data, tmp_path / "bad", EmulatorConfig(allocation="greedy", device="cpu"))
