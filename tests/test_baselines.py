"""Baseline emulators (layer-drop, channel-prune): sizes, and adapters mapped exactly onto the original."""

import json

import pytest
import torch
from safetensors.torch import load_file

from emloc import CorrectConfig, EmlocError, EmulatorConfig, TrainConfig, build_emulator, correct_adapter, train_adapter
from emloc.baselines import kept_blocks

from .conftest import make_model_dir


def test_kept_blocks_keep_the_ends_and_spread_the_middle():
    assert kept_blocks(30, 0.5) == sorted(set(kept_blocks(30, 0.5)))
    keep = kept_blocks(30, 0.5)
    assert len(keep) == 15 and keep[:2] == [0, 1] and keep[-2:] == [28, 29]
    gaps = [b - a for a, b in zip(keep[2:-2], keep[3:-2])]
    assert max(gaps) - min(gaps) <= 1  # evenly spaced
    assert kept_blocks(4, 1.0) == [0, 1, 2, 3] and len(kept_blocks(2, 0.5)) == 1


def _delta(t, key):
    a = t[f"base_model.model.{key}.lora_A.weight"]
    b = t[f"base_model.model.{key}.lora_B.weight"]
    return b @ a


@pytest.fixture(scope="module")
def deep_base(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("deep") / "base", "llama", layers=6)


def test_layer_drop_adapter_lands_on_the_blocks_it_was_trained_on(deep_base, tiny_data, tmp_path):
    emu = build_emulator(deep_base, tiny_data, tmp_path / "emu", EmulatorConfig(ratio=0.5, method="layer-drop", device="cpu"))
    m = json.loads((emu / "manifest.json").read_text())
    assert m["method"] == "layer-drop" and len(m["block_map"]) == 3
    assert json.loads((emu / "config.json").read_text())["num_hidden_layers"] == 3
    # one shard per kept block (written as each block is copied) plus the non-block weights
    shards = sorted(f.name for f in emu.glob("*.safetensors"))
    assert shards == [f"block-{j:05d}.safetensors" for j in range(3)] + ["rest.safetensors"]
    assert m["params"]["emulator"] == sum(v.numel() for f in emu.glob("*.safetensors") for v in load_file(f).values())
    ad = train_adapter(emu, tiny_data, tmp_path / "ad", TrainConfig(steps=2, batch_size=2, lr=1e-2, device="cpu", eval_fraction=0))
    with pytest.raises(EmlocError, match="--mode none"):
        correct_adapter(ad, tmp_path / "bad", config=CorrectConfig(mode="weighted"))
    out = correct_adapter(ad, tmp_path / "mapped")  # auto maps a baseline's adapter without correction
    assert json.loads((out / "manifest.json").read_text())["mode"] == "none"
    src, dst = load_file(ad / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    for j, i in m["block_map"].items():
        key = "model.layers.{}.self_attn.q_proj"
        torch.testing.assert_close(_delta(dst, key.format(i)), _delta(src, key.format(j)))
    dropped = set(range(6)) - set(m["block_map"].values())
    assert not any(f"layers.{i}." in k for k in dst for i in dropped)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(deep_base), out)
    assert model(input_ids=torch.tensor([[4, 5, 6]])).logits.isfinite().all()


def test_channel_prune_keeps_the_ratio_and_zero_fills_dropped_channels(deep_base, tiny_data, tmp_path):
    emu = build_emulator(deep_base, tiny_data, tmp_path / "emu",
                         EmulatorConfig(ratio=0.6, method="channel-prune", samples=16, device="cpu"))
    m = json.loads((emu / "manifest.json").read_text())
    k, width = m["channels_kept"], m["mlp_width"]
    assert m["mlp_consumer"] == "mlp.down_proj" and set(m["mlp_producers"]) == {"mlp.gate_proj", "mlp.up_proj"}
    assert 0 < k < width and json.loads((emu / "config.json").read_text())["intermediate_size"] == k
    assert len(list(emu.glob("block-*.safetensors"))) == 6
    assert m["params"]["emulator"] == sum(v.numel() for f in emu.glob("*.safetensors") for v in load_file(f).values())
    ad = train_adapter(emu, tiny_data, tmp_path / "ad", TrainConfig(steps=2, batch_size=2, lr=1e-2, device="cpu", eval_fraction=0))
    out = correct_adapter(ad, tmp_path / "mapped", config=CorrectConfig(mode="none"))
    src, dst = load_file(ad / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    kept = torch.tensor(m["channels"]["model.layers.3."])
    dropped = torch.tensor([c for c in range(width) if c not in set(kept.tolist())])
    down = _delta(dst, "model.layers.3.mlp.down_proj")
    torch.testing.assert_close(down[:, kept], _delta(src, "model.layers.3.mlp.down_proj"))
    assert down[:, dropped].abs().max() == 0
    up = _delta(dst, "model.layers.3.mlp.up_proj")
    torch.testing.assert_close(up[kept], _delta(src, "model.layers.3.mlp.up_proj"))
    assert up[dropped].abs().max() == 0
    with pytest.raises(EmlocError, match="below what pruning"):
        build_emulator(deep_base, tiny_data, tmp_path / "emu2", EmulatorConfig(ratio=0.1, method="channel-prune", device="cpu"))
