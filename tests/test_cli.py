"""The CLI: one-line errors with a fix, non-zero exit, nothing half-written; and a full tiny run."""

import json
import subprocess
import sys

import pytest

from emloc.cli import main

from .conftest import make_data


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def error_line(err):
    lines = [l for l in err.splitlines() if l.startswith("emloc: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_model_folder(tmp_path, capsys, tiny_data):
    code, err = run_cli(["build", "--base", str(tmp_path / "nope"), "--calibration", str(tiny_data), "--output", str(tmp_path / "e")], capsys)
    assert code == 2 and "does not exist" in error_line(err)
    assert not (tmp_path / "e").exists()


def test_folder_without_model(tmp_path, capsys, tiny_data):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["build", "--base", str(tmp_path / "empty"), "--calibration", str(tiny_data), "--output", str(tmp_path / "e")], capsys)
    assert code == 2 and "config.json" in error_line(err)


def test_model_without_linear_layers(tmp_path, capsys, tiny_data):
    """GPT-2's blocks use transformers' Conv1D, not nn.Linear: nothing emloc can compress."""
    from .conftest import make_model_dir

    base = make_model_dir(tmp_path / "gpt2", "gpt2")
    code, err = run_cli(["build", "--base", str(base), "--calibration", str(tiny_data), "--output", str(tmp_path / "e"), "--device", "cpu"], capsys)
    assert code == 2 and "nn.Linear" in error_line(err)
    assert not (tmp_path / "e").exists()


def test_targets_matching_nothing(tmp_path, capsys, tiny_base, tiny_data):
    code, err = run_cli(["build", "--base", str(tiny_base), "--calibration", str(tiny_data), "--output", str(tmp_path / "e"),
                         "--targets", "no_such_layer", "--device", "cpu"], capsys)
    assert code == 2 and "--targets" in error_line(err)


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.2", "half"])
def test_ratio_out_of_range(tmp_path, capsys, tiny_base, tiny_data, ratio):
    code, err = run_cli(["build", "--base", str(tiny_base), "--calibration", str(tiny_data), "--output", str(tmp_path / "e"),
                         "--ratio", ratio, "--device", "cpu"], capsys)
    assert code == 2 and "ratio" in error_line(err)
    assert not (tmp_path / "e").exists()


def test_ratio_table_regex_matching_nothing(tmp_path, capsys, tiny_base, tiny_data):
    t = tmp_path / "r.json"
    t.write_text(json.dumps([["q_proj", 0.5], ["this_matches_nothing", 0.3]]))
    code, err = run_cli(["build", "--base", str(tiny_base), "--calibration", str(tiny_data), "--output", str(tmp_path / "e"),
                         "--ratio-table", str(t), "--device", "cpu"], capsys)
    assert code == 2 and "matches no layer" in error_line(err)


def test_bad_data(tmp_path, capsys, tiny_base):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    code, err = run_cli(["build", "--base", str(tiny_base), "--calibration", str(bad), "--output", str(tmp_path / "e"), "--device", "cpu"], capsys)
    assert code == 2 and "expected 'prompt'" in error_line(err)


def test_non_empty_output_refused(tmp_path, capsys, tiny_emulator, tiny_data):
    out = tmp_path / "ad"
    out.mkdir()
    (out / "x").write_text("x")
    code, err = run_cli(["train", "--model", str(tiny_emulator), "--data", str(tiny_data), "--output", str(out), "--steps", "1"], capsys)
    assert code == 2 and "--overwrite" in error_line(err)
    assert (out / "x").read_text() == "x"


def test_adapter_for_another_emulator(tmp_path, capsys, tiny_base, tiny_data, tiny_adapter):
    code, _ = run_cli(["build", "--base", str(tiny_base), "--calibration", str(tiny_data), "--output", str(tmp_path / "e2"),
                       "--ratio", "0.3", "--samples", "8", "--device", "cpu"], capsys)
    assert code == 0
    code, err = run_cli(["correct", "--adapter", str(tiny_adapter), "--emulator", str(tmp_path / "e2"), "--output", str(tmp_path / "c")], capsys)
    assert code == 2 and "fingerprint" in error_line(err)
    assert not (tmp_path / "c").exists()


def test_emulator_for_another_base(tmp_path, capsys, tiny_adapter):
    from .conftest import make_model_dir

    other = make_model_dir(tmp_path / "other-base", "llama", seed=1)
    code, err = run_cli(["correct", "--adapter", str(tiny_adapter), "--base", str(other), "--output", str(tmp_path / "c")], capsys)
    assert code == 2 and "not the base model" in error_line(err)


def test_full_tiny_run_through_the_cli(tmp_path, capsys, tiny_base):
    data = make_data(tmp_path / "train.jsonl", 30)
    held = make_data(tmp_path / "eval.jsonl", 8, seed=1)
    code = main(["run", "--base", str(tiny_base), "--data", str(data), "--eval-data", str(held), "--output", str(tmp_path / "run"),
                 "--steps", "3", "--samples", "16", "--batch-size", "4", "--device", "cpu", "--exact-match"])
    out = capsys.readouterr().out
    assert code == 0
    assert "original + corrected LoRA" in out and "zero-shot original" in out
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["row"] for r in res["rows"]][:4] == ["zero-shot original", "emulator, no LoRA", "emulator + LoRA",
                                                   "original + uncorrected LoRA"]
    assert res["rows"][4]["row"].startswith("original + corrected LoRA (auto: ")
    assert all(r["exact_match"] is not None for r in res["rows"])
    # every stage ran in its own process: its peak is its own, shown against the original's inference
    assert "Peak memory of each stage" in out and res["inference_peak_rss_mb"] > 0
    assert [m["stage"].split()[0] for m in res["memory"]] == ["build", "train", "correct"]
    assert all(m["peak_rss_mb"] > 0 for m in res["memory"])
    # the demo's emulator is the measured best (`auto`: int8 at 0.5), sized in bytes, not parameters
    emanifest = json.loads((tmp_path / "run" / "emulator" / "manifest.json").read_text())
    assert {layer["kind"] for layer in emanifest["layers"].values()} == {"quant"}
    assert "% of the block linears' bytes" in out
    code = main(["merge", "--adapter", str(tmp_path / "run" / "corrected"), "--output", str(tmp_path / "merged")])
    assert code == 0 and (tmp_path / "merged" / "config.json").is_file()
    code = main(["merge", "--adapter", str(tmp_path / "run" / "adapter"), "--output", str(tmp_path / "merged2")])
    assert code == 2 and "emloc correct" in capsys.readouterr().err


def test_console_script_error_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "emloc.cli", "eval", "--model", str(tmp_path / "missing"), "--data", "x.jsonl"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("emloc: error:") and "Traceback" not in p.stderr


def test_renamed_flags_still_work_with_a_warning(tmp_path, capsys, tiny_base, tiny_data, caplog):
    # build --data is now --calibration, plan --model is now --base: the old names warn for one release
    with caplog.at_level("WARNING", logger="emloc"):
        code, _ = run_cli(["build", "--base", str(tiny_base), "--data", str(tiny_data), "--output", str(tmp_path / "e"),
                           "--samples", "4", "--method", "svd", "--device", "cpu"], capsys)
    assert code == 0 and (tmp_path / "e" / "manifest.json").is_file()
    assert any("--data is deprecated" in r.getMessage() and "--calibration" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="emloc"):
        assert main(["plan", "--model", str(tiny_base), "--device", "cpu"]) == 0
    assert "ratio" in capsys.readouterr().out
    assert any("--model is deprecated" in r.getMessage() for r in caplog.records)
    with pytest.raises(SystemExit) as exc:  # the new names stay required
        main(["build", "--base", str(tiny_base), "--output", str(tmp_path / "f")])
    assert exc.value.code == 2 and "--calibration" in capsys.readouterr().err and not (tmp_path / "f").exists()
    with pytest.raises(SystemExit):  # both names at once, disagreeing
        main(["plan", "--base", str(tiny_base), "--model", str(tmp_path)])


def test_build_budget_picks_the_plans_ratio_or_says_why_not(tiny_base, tiny_data, tmp_path, capsys):
    """`emloc build --budget`: the plan's recommended ratio is built; a budget every stage misses, or one
    the original already fits, ends in a one-line error and no output."""
    from emloc.plan import PlanConfig, predict

    plan = predict(tiny_base, PlanConfig(batch=8, seq_len=2048, dtype="fp32", device="cpu"))  # as the CLI asks below
    budget = max(e.total for e in plan.stages(0.5))
    ratio = plan.recommend(budget).ratio
    assert 0.5 <= ratio < 1  # LoRA on the original needs a little more than this budget
    base = ["build", "--base", str(tiny_base), "--calibration", str(tiny_data), "--samples", "8", "--device", "cpu",
            "--plan-batch", "8", "--plan-seq-len", "2048"]
    code, err = run_cli(base + ["--output", str(tmp_path / "small"), "--budget", "1MB"], capsys)
    assert code == 2 and "nothing fits" in error_line(err) and not (tmp_path / "small").exists()
    code, err = run_cli(base + ["--output", str(tmp_path / "large"), "--budget", "1000GB"], capsys)
    assert code == 2 and "Train LoRA on the original directly" in error_line(err)
    code, err = run_cli(base + ["--output", str(tmp_path / "emu"), "--budget", str(budget)], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "emu" / "manifest.json").read_text())["config"]["ratio"] == ratio
