"""Sharded training (FSDP2) and the state that must be gathered from every process to be saved.

With `--fsdp` each transformer block, and then the whole model, is wrapped by PyTorch's FSDP2
`fully_shard`: between uses a process holds 1/N of every parameter (frozen weights included), and the
gradients of the LoRA weights are reduce-scattered. It runs on CUDA (NCCL) and on CPU (gloo), so the
same code is tested on two CPU processes.

Every function here that reads sharded state is a collective: each process must call it, in the same
order, or the job hangs. Callers therefore call them on every rank and only then let the main process
write. The same functions serve the replicated (one process, DDP) case, where they are plain reads.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

LORA = "lora_"


def shard_model(model: nn.Module, blocks: Iterable[nn.Module]) -> None:
    """Apply FSDP2 to every block, then to the root (embeddings, final norm, head), in place."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full LoRA weights (frozen ones included), keyed like `model.state_dict()`, as CPU copies.

    A collective under FSDP: every process gets the full tensors.
    """
    return {name: _full(p.detach()).to("cpu", copy=True) for name, p in model.named_parameters() if LORA in name}


@torch.no_grad()
def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set the LoRA weights from `lora_state` output; sharded parameters take their own slice."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    missing = [k for k in params if LORA in k and k not in state]
    if missing:
        raise KeyError(f"the saved LoRA state lacks {missing[0]}")
    for name, value in state.items():
        p = params[name]
        if isinstance(p, DTensor):
            p.copy_(distribute_tensor(value.to(p.dtype), p.device_mesh, p.placements))
        else:
            p.copy_(value)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Inverse of `optimizer_state`; every process passes the same full state and keeps its slice."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG state (CPU, and the current CUDA device's when training on CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
