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
import pickle
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .artifacts import to_jsonable
from .errors import EmlocError


def fault_point(stage: str, index: int) -> None:
    """Kill this process with SIGKILL if `EMLOC_FAULT_<STAGE>` equals `index` (for crash tests)."""
    if os.environ.get(f"EMLOC_FAULT_{stage.upper()}") == str(index):
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_dir(output: Path) -> Path:
    return output.parent / f"{output.name}.checkpoint"


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes (None for no file): a resume must see the same data, not only the same path."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_key(cfg: Any, model_fingerprint: str, data: str | Path, eval_data: str | Path | None = None) -> str:
    """What must match for a resume to be exact: settings (those that change the result), model, and the data's bytes."""
    d = to_jsonable(cfg)
    for k in ("save_every", "resume", "eval_every", "device"):
        d.pop(k, None)
    inputs = [str(Path(data).expanduser().resolve()), file_digest(data),
              str(Path(eval_data).expanduser().resolve()) if eval_data else None, file_digest(eval_data)]
    return hashlib.sha256(json.dumps([d, model_fingerprint, inputs], sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(folder: Path, key: str, step: int, log_rows: list[dict[str, Any]], adapter_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], scheduler_state: dict[str, Any], rng_states: list[dict[str, torch.Tensor]]) -> None:
    """Write a checkpoint atomically (main process only; the states are the full, gathered ones)."""
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in adapter_state.items()}, tmp / "adapter.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler_state, tmp / "scheduler.pt")
    torch.save(rng_states, tmp / "rng.pt")  # one entry per process
    (tmp / "state.json").write_text(json.dumps({"key": key, "step": step, "log": log_rows, "processes": len(rng_states)}))
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint's contents, or None if there is none; refuses one from different settings or data.

    Pickled parts are read with `weights_only=True`: a checkpoint folder cannot run code.
    """
    state_file = folder / "state.json"
    if not state_file.is_file():
        return None
    state = json.loads(state_file.read_text())
    if state["key"] != key:
        raise EmlocError(f"the checkpoint in {folder} was made with other settings, model or data; "
                         "resume with the same command, or delete the checkpoint folder to start over")
    try:
        state["adapter"] = load_file(folder / "adapter.safetensors")
        for part in ("optimizer", "scheduler", "rng"):
            state[part] = torch.load(folder / f"{part}.pt", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise EmlocError(f"the checkpoint in {folder} is unreadable ({str(exc).splitlines()[0][:120]}); "
                         "delete it to start over") from None
    return state
