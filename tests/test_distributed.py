"""Two CPU processes (DDP, or FSDP2 sharding, over gloo) train exactly what one process trains with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import make_data

pytestmark = pytest.mark.slow


def test_two_processes_match_one(tmp_path, tiny_emulator):
    data = make_data(tmp_path / "d.jsonl", 40)
    common = ["train", "--model", str(tiny_emulator), "--data", str(data), "--steps", "4", "--batch-size", "8",
              "--micro-batch-size", "2", "--lr", "0.01", "--eval-every", "2", "--device", "cpu",
              "--save-every", "2"]  # a checkpoint mid-run: its gathering must not hang or change the result
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "emloc.cli", "-q", *common, "--output", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                          "-m", "emloc.cli", "-q", *common, "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["processes"] == 2
    rows1 = [json.loads(x) for x in (tmp_path / "one" / "loss_log.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (tmp_path / "two" / "loss_log.jsonl").read_text().splitlines()]
    assert len(rows1) == len(rows2) == 4
    for a, b in zip(rows1, rows2):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a.get("eval_loss", 0) - b.get("eval_loss", 0)) < 1e-5
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(float(v.abs().max()) > 1e-4 for k, v in b.items() if "lora_B" in k)  # not empty
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def _launch(args, env, port):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                           "-m", "emloc.cli", "-q", *args], capture_output=True, text=True, env=env, timeout=600)


def _losses(folder):
    return [json.loads(x) for x in (folder / "loss_log.jsonl").read_text().splitlines()]


def test_fsdp_two_processes_match_one_and_resume(tmp_path, tiny_emulator):
    """FSDP2 shards the emulator over two processes: same loss curve, a full (non-empty) adapter equal to the
    one-process run, and a checkpoint written from both shards that resumes to the same result."""
    data = make_data(tmp_path / "d.jsonl", 40)
    common = ["train", "--model", str(tiny_emulator), "--data", str(data), "--steps", "6", "--batch-size", "8",
              "--micro-batch-size", "2", "--lr", "0.01", "--eval-every", "3", "--device", "cpu", "--save-every", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "emloc.cli", "-q", *common, "--output", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _launch([*common, "--fsdp", "--output", str(tmp_path / "two")], env, 29533)
    assert two.returncode == 0, two.stderr[-3000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["sharded"] is True
    ref = load_file(tmp_path / "one" / "adapter_model.safetensors")
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two")):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a.get("eval_loss", 0) - b.get("eval_loss", 0)) < 1e-5
    got = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert got.keys() == ref.keys() and all(got[k].shape == ref[k].shape for k in ref)  # full tensors, not rank 0's shard
    assert any(float(v.abs().max()) > 1e-4 for k, v in got.items() if "lora_B" in k)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)
    # killed after the step-4 checkpoint, then resumed: the same adapter
    cut = _launch([*common, "--fsdp", "--output", str(tmp_path / "cut")], dict(env, EMLOC_FAULT_TRAIN_STEP="5"), 29534)
    assert cut.returncode != 0 and not (tmp_path / "cut").exists()
    assert json.loads((tmp_path / "cut.checkpoint" / "state.json").read_text())["step"] == 4
    res = _launch([*common, "--fsdp", "--output", str(tmp_path / "cut"), "--resume"], env, 29535)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["loss"] for r in _losses(tmp_path / "cut")] == pytest.approx([r["loss"] for r in _losses(tmp_path / "one")], abs=1e-5)
    for k, v in load_file(tmp_path / "cut" / "adapter_model.safetensors").items():
        torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=1e-4)


def test_ddp_does_not_broadcast_the_frozen_codes():
    """Every rank loads the same codes; DDP's default would send all of them from rank 0 before every forward."""
    from emloc import TrainConfig
    from emloc.train import _accelerator

    assert _accelerator(TrainConfig(device="cpu")).ddp_handler.broadcast_buffers is False
