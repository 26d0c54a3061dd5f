"""`emloc heal`: the healing term moves the emulator towards the original, and the healed emulator is a
complete emulator (loads, trains, corrects exactly against its own W_e)."""

from __future__ import annotations

import json

import pytest
import torch

from emloc import CorrectConfig, EmlocError, HealConfig, TrainConfig, correct_adapter, heal_emulator, load_emulator, train_adapter
from emloc.cli import main


@pytest.fixture(scope="module")
def healed(tiny_emulator, tmp_path_factory):
    return heal_emulator(tiny_emulator, tmp_path_factory.mktemp("heal") / "healed",
                         HealConfig(rank=4, steps=30, batch_size=8, lr=1e-2, top_k=8, device="cpu"))


def _kl_to_original(base, emu_model, ids):
    from emloc.train import load_model

    with torch.no_grad():
        p = torch.log_softmax(load_model(base, "cpu").forward(input_ids=ids).logits.float(), -1)
        q = torch.log_softmax(emu_model(input_ids=ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_heal_lowers_the_distance_to_the_original_and_counts_its_bytes(tiny_base, tiny_emulator, healed, tiny_data):
    m, src = json.loads((healed / "manifest.json").read_text()), json.loads((tiny_emulator / "manifest.json").read_text())
    assert m["kind"] == "emulator" and m["healed"]["loss_after"] < m["healed"]["loss_before"]
    for name, e in m["layers"].items():
        if e["rank"] is not None:
            assert e["rank"] == src["layers"][name]["rank"] + 4 and e["heal_rank"] == 4
            assert e["bytes"] == src["layers"][name]["bytes"] + 2 * 4 * (e["in_features"] + e["out_features"])
    assert m["bytes"]["fraction"] > src["bytes"]["fraction"]
    # full-vocabulary KL to the original on records of the calibration file: lower after healing
    ids = torch.randint(4, 60, (4, 12), generator=torch.Generator().manual_seed(0))
    assert _kl_to_original(tiny_base, load_emulator(healed, "cpu"), ids) < _kl_to_original(tiny_base, load_emulator(tiny_emulator, "cpu"), ids)


def test_healed_emulator_equals_the_emulator_plus_its_folded_term(tiny_emulator, healed):
    """Each compressed layer of the healed emulator is W_e + B A: the old factors are kept, the term appended."""
    old, new = load_emulator(tiny_emulator, "cpu"), load_emulator(healed, "cpu")
    old_layers = dict(old.named_modules())
    changed = 0
    for name, mod in new.named_modules():
        if hasattr(mod, "dense_weight") and hasattr(mod, "rank"):
            prev = old_layers[name]
            torch.testing.assert_close(mod.down[: prev.rank], prev.down)
            torch.testing.assert_close(mod.up[:, : prev.rank], prev.up)
            changed += int(not torch.allclose(mod.dense_weight(), prev.dense_weight()))
    assert changed > 0


def test_task_adapter_on_a_healed_emulator_trains_and_corrects(healed, tiny_data, tmp_path):
    ad = train_adapter(healed, tiny_data, tmp_path / "ad", TrainConfig(steps=2, batch_size=4, rank=4, eval_every=0, device="cpu"))
    out = correct_adapter(ad, tmp_path / "c", config=CorrectConfig(mode="paper", clamp=None, device="cpu"))
    report = json.loads((out / "manifest.json").read_text())
    assert report["emulator"] == str(healed.resolve()) and report["directions"] > 0


def test_heal_settings_and_inputs_are_one_line_errors(tiny_emulator, tiny_data, tmp_path, capsys):
    with pytest.raises(EmlocError, match="--rank"):
        HealConfig(rank=0)
    with pytest.raises(EmlocError, match="not an emulator"):
        heal_emulator(tmp_path, tmp_path / "out")
    assert main(["heal", "--emulator", str(tiny_emulator), "--output", str(tiny_emulator), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("emloc: error:")
