"""`emloc bench --preset smoke`: every row, report files, and resume without redoing rows.

The mechanics run on a tiny model (every stage is a child process, so the real SmolLM2 would make
this one test several minutes); the bench's numbers on real models are in the README.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from emloc import EmlocError
from emloc.cli import main

from .conftest import make_data, make_model_dir

pytestmark = pytest.mark.slow


def test_bench_smoke_runs_every_row_and_resumes(tmp_path):
    out = tmp_path / "bench"
    base = make_model_dir(tmp_path / "base", "llama", layers=4)  # layer drop keeps 2 of its blocks
    data, held = make_data(tmp_path / "train.jsonl", 40), make_data(tmp_path / "eval.jsonl", 12, seed=1)
    args = ["bench", "--preset", "smoke", "--output", str(out), "--device", "cpu", "--base", str(base),
            "--data", str(data), "--eval-data", str(held)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    methods = {r["method"] for r in report["rows"]}
    for m in ("zero-shot original", "LoRA on the original", "EMLoC (weighted correction)", "EMLoC (paper correction, L=3)",
              "EMLoC uncorrected", "EMLoC adapter on the emulator", "ablation: paper correction, clamp L=none",
              "ablation: plain SVD, weighted", "ablation: energy rank allocation, weighted",
              "ablation: sequential calibration, weighted",
              "ablation: 4 calibration samples, weighted",
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
    assert main(args) == 0
    assert (out / "rows" / "zero-shot-s0.json").stat().st_mtime == stamp


def test_bench_training_rows_checkpoint_and_resume(tiny_emulator, tiny_data, tmp_path):
    """A bench row's training, killed after a checkpoint, resumes to the adapter of an uninterrupted run."""
    from emloc.bench import BenchConfig
    from emloc.bench_runner import _Runner

    r = _Runner(tmp_path, BenchConfig(steps=4, batch_size=4, rank=2, max_length=64, device="cpu", dtype="float32"))
    assert r.resumable() == ["--save-every", "1", "--resume"]
    whole = r.train("whole", str(tiny_emulator), str(tiny_data), None, 0)
    r.env["EMLOC_FAULT_TRAIN_STEP"] = "3"  # SIGKILL after step 3 (its checkpoint is written)
    with pytest.raises(EmlocError):
        r.train("part", str(tiny_emulator), str(tiny_data), None, 0)
    assert (tmp_path / "part.checkpoint").is_dir() and not (tmp_path / "part").exists()
    del r.env["EMLOC_FAULT_TRAIN_STEP"]
    resumed = r.train("part", str(tiny_emulator), str(tiny_data), None, 0)
    a, b = (load_file(p / "adapter_model.safetensors") for p in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bench_gradient_checkpointing_reaches_every_training_row(tmp_path):
    """`gradient_checkpointing` adds the flag to each training stage once, and only then."""
    from emloc.bench import PRESETS, BenchConfig
    from emloc.bench_runner import _Runner

    seen: list[tuple[str, ...]] = []
    for on in (False, True):
        r = _Runner(tmp_path, BenchConfig(gradient_checkpointing=on))
        r.cli = lambda *args: seen.append(args)  # type: ignore[method-assign]
        r.train("a", "m", "d.jsonl", None, 0)
        r.train("b", "m", "d.jsonl", None, 0, "--gradient-checkpointing")
    assert [a.count("--gradient-checkpointing") for a in seen] == [0, 1, 1, 1]
    assert PRESETS["bigger-in-budget"].gradient_checkpointing


def test_bench_only_runs_the_named_rows_and_lists_the_rest(tmp_path):
    out = tmp_path / "bench"
    base = make_model_dir(tmp_path / "base", "llama")
    data, held = make_data(tmp_path / "train.jsonl", 20), make_data(tmp_path / "eval.jsonl", 6, seed=1)
    args = ["bench", "--preset", "smoke", "--output", str(out), "--device", "cpu", "--base", str(base),
            "--data", str(data), "--eval-data", str(held), "--only", "zero-shot-s*"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["zero-shot original"]
    assert sorted(p.name for p in (out / "rows").iterdir()) == ["zero-shot-s0.json"]
    unfinished = report["not_run"]["unfinished rows"]
    assert "lora-original-s0" in unfinished and "zero-shot-s0" not in unfinished
