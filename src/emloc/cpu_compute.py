"""Frozen bf16/fp16 matrix products in float32 on CPUs without bf16 matrix units.

On x86 CPUs without AVX512-BF16 or AMX (and ARM CPUs without the BF16 extension) PyTorch runs bf16
matrix products through slow fallback kernels: measured on an AVX2 AMD EPYC with torch 2.13, a
(1024 x 1536) by (1536 x 576) product took 116 ms in bf16 against 16 ms in float32 (forward), and
the input-gradient product g @ W 0.9-1.0 s against 12-16 ms. Upcasting both operands to float32
for the product costs 15 ms. So on such CPUs every frozen low-precision product here runs in
float32 and returns its result in the activations' dtype: the weights stay stored in bf16 (the
memory an emulator or a plan claims), only one layer's float32 copy exists at a time, and the
result is what a bf16 kernel with float32 accumulation gives, up to the rounding of the sum.

`_UpcastLinear` keeps the bf16 weight itself (a reference, not a copy) for the backward pass, so
autograd never holds a float32 copy of the model between the passes.

`EMLOC_CPU_MATMUL=native` keeps PyTorch's own kernels; `EMLOC_CPU_MATMUL=float32` forces the upcast.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EmlocError

log = logging.getLogger(__name__)

LOW_PRECISION = (torch.bfloat16, torch.float16)
MODES = ("auto", "native", "float32")


def bf16_units_in(cpuinfo: str, machine: str) -> bool:
    """Whether a CPU with this /proc/cpuinfo text and `platform.machine()` has bf16 matrix instructions
    (True when the text lists no flags: nothing to go on, leave torch alone)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return True
    if machine.lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return "bf16" in flags  # aarch64: the BF16 extension (bfmmla, bfdot)


@functools.cache
def cpu_has_bf16_units() -> bool:
    """`bf16_units_in` for this machine (True where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return bf16_units_in(text, platform.machine())


def upcast_on_cpu() -> bool:
    """Whether frozen low-precision products on the CPU run in float32 (`EMLOC_CPU_MATMUL` or the CPU)."""
    mode = os.environ.get("EMLOC_CPU_MATMUL", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise EmlocError(f"EMLOC_CPU_MATMUL={mode!r} is not a mode; set it to one of {', '.join(MODES)}")
    return mode == "float32" or (mode == "auto" and not cpu_has_bf16_units())


def compute_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a frozen product of `dtype` operands on `device` runs in."""
    if dtype in LOW_PRECISION and torch.device(device).type == "cpu" and upcast_on_cpu():
        return torch.float32
    return dtype


class _UpcastLinear(torch.autograd.Function):
    """y = x W^T + b computed in float32 for frozen W, b; backward gives x's gradient only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)  # the stored low-precision tensor: no float32 copy kept
        b = None if bias is None else bias.float()
        return F.linear(x.float(), weight.float(), b).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return (grad.float() @ weight.float()).to(grad.dtype), None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), in float32 when `compute_dtype` says so and weight and bias are frozen.

    Args:
        x: ... x n activations (the output has their dtype).
        weight: m x n.
        bias: m, or None.
    """
    trainable = weight.requires_grad or (bias is not None and bias.requires_grad)
    if trainable or compute_dtype(weight.dtype, weight.device) == weight.dtype:
        return F.linear(x, weight, bias)
    return _UpcastLinear.apply(x, weight, bias)  # without grad, autograd records nothing


class UpcastLinear(nn.Linear):
    """An `nn.Linear` whose frozen low-precision product runs through `frozen_linear` (same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)


def upcast_frozen_linears(model: nn.Module) -> int:
    """Route every plain low-precision `nn.Linear` of `model` on a CPU through `frozen_linear`.

    The layers change class in place (their parameters, names and state dict stay as they are);
    whether a layer is frozen is decided at each call, so LoRA-trained or unfrozen layers keep
    PyTorch's own product. Returns the number of layers rerouted (0 where nothing needs it).
    """
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and compute_dtype(module.weight.dtype, module.weight.device) != module.weight.dtype:
            module.__class__ = UpcastLinear
            n += 1
    if n:
        log.info("this CPU has no bf16 matrix units: %d frozen bf16/fp16 linear layers compute in float32 "
                 "(weights stay in their dtype; EMLOC_CPU_MATMUL=native to disable)", n)
    return n
