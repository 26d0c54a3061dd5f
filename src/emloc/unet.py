"""The glue between a UNet's blocks, for the block-streaming engine.

`UNet2DConditionModel.forward` runs `conv_in`, then each down block (which returns the hidden
states and the skip tensors it leaves for the up blocks), the mid block, and each up block (which
takes back as many skip tensors as it has resnets), with the time embedding and, for blocks with
cross-attention, the text states. The engine captures the inputs of the first down block and runs
one block at a time; this glue builds each next block's arguments from the previous block's output
the same way, keeping the skip tensors in the batch's `state`. (The text states come from the
first block's arguments when it has cross-attention, else from the model inputs: a UNet with an
`encoder_hid_proj` whose first block has none is not supported. Image sizes must be multiples of
the UNet's total downsampling, so that no up block needs an explicit `upsample_size`.)
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .stream import _Batch

_CROSS = ("attention_mask", "cross_attention_kwargs", "encoder_attention_mask")


def _takes_skips(block: nn.Module) -> bool:
    return "res_hidden_states_tuple" in inspect.signature(block.forward).parameters


class UNetGlue:
    """`start` after the capture of down block 0's inputs; `carry` from each block to the next."""

    def start(self, batch: _Batch, model_inputs: dict[str, Any]) -> _Batch:
        kw = batch.kwargs
        text = kw.get("encoder_hidden_states", model_inputs.get("encoder_hidden_states"))
        state = {"temb": kw.get("temb"), "text": text, "skips": (batch.hidden,),
                 "cross": {k: kw.get(k) for k in _CROSS}}
        return _Batch(batch.hidden, kw, batch.mask, batch.args, state)

    def carry(self, out: Any, batch: _Batch, nxt: nn.Module) -> _Batch:
        state = dict(batch.state or {})
        if isinstance(out, tuple):  # a down block: (hidden states, its skip tensors)
            hidden, skips = out
            state["skips"] = state["skips"] + tuple(skips)
        else:  # the mid block or an up block
            hidden = out
        kwargs: dict[str, Any] = {"temb": state["temb"]}
        if getattr(nxt, "has_cross_attention", False):
            kwargs.update(encoder_hidden_states=state["text"], **state["cross"])
        if _takes_skips(nxt):
            n = len(nxt.resnets)
            kwargs.update(res_hidden_states_tuple=state["skips"][-n:], upsample_size=None)
            state["skips"] = state["skips"][:-n]
        return _Batch(hidden, kwargs, batch.mask, (), state)
