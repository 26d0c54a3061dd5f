"""The bench report's arithmetic: recovered fraction, seed spread, and the auto row's twin check."""

import statistics

import pytest
import torch
from safetensors.torch import save_file

from emloc.bench import PRESETS, _recovered, _same_tensors, format_report, job_priority, seed_spread


def _rows():
    rows = []
    for seed, (zero, full, emloc) in enumerate([(3.0, 1.0, 1.5), (3.0, 0.8, 1.7), (3.0, 1.2, 1.6)]):
        rows += [{"method": "zero-shot original", "ratio": None, "seed": seed, "nll": zero, "exact_match": 0.0},
                 {"method": "LoRA on the original", "ratio": None, "seed": seed, "nll": full, "exact_match": 0.8},
                 {"method": "EMLoC", "ratio": 0.5, "seed": seed, "nll": emloc, "exact_match": 0.1 * seed}]
    rows.append({"method": "baseline", "ratio": 0.5, "seed": 0, "nll": 2.0, "exact_match": None})
    return rows


def test_recovered_is_per_seed():
    rows = _rows()
    _recovered(rows)
    emloc = [r for r in rows if r["method"] == "EMLoC"]
    assert [r["recovered"] for r in emloc] == pytest.approx([(3 - 1.5) / 2.0, (3 - 1.7) / 2.2, (3 - 1.6) / 1.8])
    assert next(r for r in rows if r["method"] == "baseline")["recovered"] == pytest.approx(0.5)


def test_seed_spread_only_for_repeated_rows():
    rows = _rows()
    _recovered(rows)
    spread = {(x["method"], x["ratio"]): x for x in seed_spread(rows)}
    assert ("baseline", 0.5) not in spread  # one seed: no spread
    e = spread[("EMLoC", 0.5)]
    assert e["seeds"] == "0, 1, 2"
    assert e["nll_mean"] == pytest.approx(1.6) and e["nll_std"] == pytest.approx(statistics.stdev([1.5, 1.7, 1.6]))
    assert e["recovered_min"] == pytest.approx(1.3 / 2.2) and e["recovered_max"] == pytest.approx(1.4 / 1.8)
    report = {"command": "emloc bench", "base": "/m/base", "task": "t", "versions": {"emloc": "0"}, "rows": rows,
              "not_run": {"QLoRA": "no GPU"}}
    md = format_report(report)
    assert "machine:" in md and "Spread over seeds" in md and "| EMLoC | 0.5 | 0, 1, 2 | 1.6000 ± 0.1000 |" in md


def test_same_tensors(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    t = {"x.lora_A.weight": torch.randn(2, 3), "x.lora_B.weight": torch.randn(3, 2)}
    for folder, tensors in ((a, t), (b, {k: v.clone() for k, v in t.items()}),
                            (c, {**t, "x.lora_B.weight": t["x.lora_B.weight"] + 1e-6})):
        folder.mkdir()
        save_file(tensors, folder / "adapter_model.safetensors")
    assert _same_tensors(a, b)
    assert not _same_tensors(a, c)
    assert not _same_tensors(a, tmp_path / "missing")


def _ordered(names: list[str], preset: str) -> list[str]:
    return sorted(names, key=lambda n: job_priority(n, PRESETS[preset]))


def test_order_puts_the_budget_comparison_before_the_over_budget_reference():
    names = ["zero-shot-s0", "lora-original-s0", "emloc-0.15-s0", "auto-0.15-s0", "smaller"]
    got = _ordered(names, "bigger-in-budget")
    assert got.index("lora-original-s0") == len(got) - 1
    assert set(got[:-1]) == {"zero-shot-s0", "emloc-0.15-s0", "auto-0.15-s0", "smaller"}
    assert not PRESETS["bigger-in-budget"].baselines


def test_order_main_rows_then_repeats_then_baselines_then_ablations():
    names = ["plain-svd", "layer-drop-0.5", "lora-original-s1", "zero-shot-s0", "lora-original-s0", "emloc-0.5-s0"]
    assert _ordered(names, "small") == ["zero-shot-s0", "lora-original-s0", "emloc-0.5-s0", "lora-original-s1",
                                        "layer-drop-0.5", "plain-svd"]


def test_frozen_weights_column_shows_bytes_held_and_nothing_else():
    """A parameter count leaves a quantised emulator's codes out: only recorded bytes are shown."""
    rows = _rows()
    rows[2].update(trained_model_bytes=3 * 2**20, trained_model_params=10**6)
    rows[1].update(trained_model_params=5 * 10**6)
    _recovered(rows)
    md = format_report({"command": "", "base": "/m/base", "task": "t", "versions": {}, "rows": rows, "not_run": {}})
    lines = md.splitlines()
    emloc = next(x for x in lines if x.startswith("| EMLoC | 0.5 |"))
    lora = next(x for x in lines if x.startswith("| LoRA on the original |"))
    assert emloc.split(" | ")[7] == "3" and lora.split(" | ")[7] == "-"
