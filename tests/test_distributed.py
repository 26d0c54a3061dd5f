"""Two CPU processes (DDP over gloo) train exactly what one process trains with the same global batch."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from .conftest import make_data


def test_two_processes_match_one(tmp_path, tiny_emulator):
    data = make_data(tmp_path / "d.jsonl", 40)
    common = ["train", "--model", str(tiny_emulator), "--data", str(data), "--steps", "4", "--batch-size", "8",
              "--micro-batch-size", "2", "--lr", "0.01", "--eval-every", "2", "--device", "cpu"]
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
