"""Nothing lost on faults: real subprocesses killed mid-stage, resume to the same result."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from emloc import EmlocError

from .conftest import make_data


def emloc_cli(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "emloc.cli", "-q", *args], capture_output=True, text=True, env=env, timeout=600)


def looks_complete(folder):
    return folder.exists() and (folder / "manifest.json").exists()


def test_killed_build_correct_merge_leave_nothing_that_looks_complete(tmp_path, tiny_base, tiny_data, tiny_adapter):
    p = emloc_cli(["build", "--base", str(tiny_base), "--calibration", str(tiny_data), "--output", str(tmp_path / "emu"),
                   "--samples", "8", "--device", "cpu"], {"EMLOC_FAULT_BUILD_BLOCK": "1"})
    assert p.returncode == -9  # SIGKILL after the first block was written
    assert not (tmp_path / "emu").exists()
    assert not any(looks_complete(x) for x in tmp_path.iterdir())
    # a new run cleans the dead process's temporary folder and completes
    p = emloc_cli(["build", "--base", str(tiny_base), "--calibration", str(tiny_data), "--output", str(tmp_path / "emu"),
                   "--samples", "8", "--device", "cpu"])
    assert p.returncode == 0, p.stderr
    assert [x.name for x in tmp_path.iterdir()] == ["emu"]

    p = emloc_cli(["correct", "--adapter", str(tiny_adapter), "--output", str(tmp_path / "cor")], {"EMLOC_FAULT_CORRECT_WRITE": "1"})
    assert p.returncode == -9 and not (tmp_path / "cor").exists()
    p = emloc_cli(["correct", "--adapter", str(tiny_adapter), "--output", str(tmp_path / "cor")])
    assert p.returncode == 0, p.stderr
    p = emloc_cli(["merge", "--adapter", str(tmp_path / "cor"), "--output", str(tmp_path / "merged")], {"EMLOC_FAULT_MERGE_SHARD": "1"})
    assert p.returncode == -9 and not (tmp_path / "merged").exists()


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_emulator):
    data = make_data(tmp_path / "d.jsonl", 30)
    common = ["train", "--model", str(tiny_emulator), "--data", str(data), "--steps", "6", "--batch-size", "4",
              "--micro-batch-size", "2", "--lr", "0.01", "--save-every", "2", "--eval-every", "3", "--device", "cpu",
              "--dropout", "0.1"]
    p = emloc_cli(common + ["--output", str(tmp_path / "full")])
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "full.checkpoint").exists()  # removed once the adapter is complete
    p = emloc_cli(common + ["--output", str(tmp_path / "cut")], {"EMLOC_FAULT_TRAIN_STEP": "5"})
    assert p.returncode == -9
    assert not (tmp_path / "cut").exists()
    assert json.loads((tmp_path / "cut.checkpoint" / "state.json").read_text())["step"] == 4
    p = emloc_cli(common + ["--output", str(tmp_path / "cut"), "--resume"])
    assert p.returncode == 0, p.stderr
    a, b = load_file(tmp_path / "full" / "adapter_model.safetensors"), load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    la = (tmp_path / "full" / "loss_log.jsonl").read_text().splitlines()
    lb = (tmp_path / "cut" / "loss_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in la] == pytest.approx([json.loads(x)["loss"] for x in lb], abs=1e-5)
    # a checkpoint from other settings is refused
    p = emloc_cli(common + ["--output", str(tmp_path / "cut2")], {"EMLOC_FAULT_TRAIN_STEP": "3"})
    p = emloc_cli([*common[:-8], "--lr", "0.02", *common[-6:], "--output", str(tmp_path / "cut2"), "--resume"])
    assert p.returncode == 2 and "other settings" in p.stderr


@pytest.mark.parametrize("code,match", [(errno.ENOSPC, "disk full"), (errno.EACCES, "permission denied")])
def test_disk_full_and_permission_errors_are_clear(tmp_path, tiny_adapter, monkeypatch, code, match):
    import emloc.correct as correct_mod

    def fail(*a, **k):
        raise OSError(code, os.strerror(code), str(tmp_path / "x"))

    monkeypatch.setattr(correct_mod, "save_finite", fail)
    with pytest.raises(EmlocError, match=match):
        correct_mod.correct_adapter(tiny_adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(x.name.startswith(".out") for x in tmp_path.iterdir())
