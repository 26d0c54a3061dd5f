"""Training checkpoints (adapter, optimizer, scheduler, data position, RNG) and fault points.

A checkpoint lives next to the output folder, as `<output>.checkpoint/`, written under a
temporary name and renamed, so a kill at any moment leaves either the previous checkpoint or the
new one. `--resume` continues from it; the data order is a function of the seed and the step, so
the resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from .artifacts import to_jsonable
from .errors import EmlocError


def fault_point(stage: str, index: int) -> None:
    """Kill this process with SIGKILL if `EMLOC_FAULT_<STAGE>` equals `index` (for crash tests)."""
    if os.environ.get(f"EMLOC_FAULT_{stage.upper()}") == str(index):
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_dir(output: Path) -> Path:
    return output.parent / f"{output.name}.checkpoint"


def config_key(cfg: Any, model_fingerprint: str, data: str) -> str:
    """What must match for a resume to be exact (the settings that do not change the result are left out)."""
    d = to_jsonable(cfg)
    for k in ("save_every", "resume", "eval_every", "device"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps([d, model_fingerprint, data], sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(folder: Path, key: str, step: int, log_rows: list[dict[str, Any]], adapter_state: dict[str, torch.Tensor],
                    optimizer, scheduler) -> None:
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save({k: v.detach().cpu() for k, v in adapter_state.items()}, tmp / "adapter.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(torch.get_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"key": key, "step": step, "log": log_rows}))
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint's contents, or None if there is none; refuses one from different settings."""
    state_file = folder / "state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    if state["key"] != key:
        raise EmlocError(f"the checkpoint in {folder} was made with other settings, model or data; "
                         "resume with the same command, or delete the checkpoint folder to start over")
    state["adapter"] = torch.load(folder / "adapter.pt")
    state["optimizer"] = torch.load(folder / "optimizer.pt")
    state["scheduler"] = torch.load(folder / "scheduler.pt")
    state["rng"] = torch.load(folder / "rng.pt")
    return state
