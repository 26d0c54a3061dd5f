"""Calibration statistics of the ORIGINAL model, streamed block by block.

`emloc correct --mode weighted` needs, for every compressed layer, the Gram matrix G = sum x x^T of
the inputs x the original layer sees on the calibration data (the same records `emloc build` used).
This module recomputes them the way `build_emulator` does, inside the same memory: the model
skeleton lives on the meta device, the embeddings run once to capture block 0's inputs, then each
block is read from the safetensors shards, run on the calibration states (hooks accumulate the
Grams of the wanted layers), handed to the caller, and freed. Peak memory: the non-block weights,
one block, the calibration hidden states and one block's Grams.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import load_examples, sample
from .errors import EmlocError
from .models import WeightStore, block_linears, empty_model, find_blocks, load_config, materialize, to_meta


def calibration_ids(path: str | Path, tok, samples: int, max_length: int, seed: int,
                    calibration_tokens: int | None = None) -> list[list[int]]:
    """The token ids of the calibration records: a seeded draw of `samples` records of `path`.

    With `calibration_tokens`, records past `samples` are added (in the same order) until the
    calibration holds at least that many tokens. `emloc build` and `emloc correct` call this with
    the same arguments, so they see the same records.
    """
    examples = sample(load_examples(path, tok, max_length), 10**9, seed)
    chosen = examples[:samples]
    if calibration_tokens:
        for e in examples[samples:]:
            if sum(len(c.input_ids) for c in chosen) >= calibration_tokens:
                break
            chosen.append(e)
    return [e.input_ids for e in chosen]


def stream_input_grams(base_dir: Path, ids: list[list[int]], modules: set[str], device: torch.device,
                       dtype: torch.dtype, stats_dtype: torch.dtype = torch.float64,
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (module name, Gram of its inputs (n x n, `stats_dtype`)) for every wanted module.

    Args:
        base_dir: the original model's folder.
        ids: calibration token ids, one list per record.
        modules: full names of block linears (e.g. `model.layers.3.mlp.down_proj`).
        device: where the forward passes run.
        dtype: dtype of the forward passes.
        stats_dtype: dtype of the accumulated Grams.

    Modules are yielded block by block, in module order; the Gram is unnormalised (a sum over tokens).
    """
    from .emulator import _block_output, _capture_block_inputs

    model = empty_model(load_config(base_dir))
    model.eval()
    store = WeightStore(base_dir).align(model)
    blocks_name, blocks = find_blocks(model)
    prefix = blocks_name + "."
    outside = [m for m in modules if not m.startswith(prefix)]
    if outside:
        raise EmlocError(f"{outside[0]} is not a linear layer inside the transformer blocks ({blocks_name}); "
                         "emloc corrects LoRA on block linears only")
    materialize(model, "", store, device, dtype, keep=lambda name: not name.startswith(prefix))
    store.release()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    inputs = _capture_block_inputs(model, blocks[0], ids, device)
    last = max(int(m[len(prefix):].split(".")[0]) for m in modules)
    for i in tqdm(range(last + 1), desc="calibration statistics", unit="block", leave=False):
        block, bprefix = blocks[i], f"{prefix}{i}."
        wanted = {rel: lin for rel, lin in block_linears(block) if bprefix + rel in modules}
        materialize(block, bprefix, store, device, dtype)
        grams = {rel: torch.zeros(lin.in_features, lin.in_features, dtype=stats_dtype, device=device)
                 for rel, lin in wanted.items()}
        shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # q, k and v (gate and up) read one tensor: one product

        def acc(_m, args, _out, rel: str) -> None:
            x = args[0].detach()
            key = id(x)
            if key not in shared:
                flat = x.reshape(-1, x.shape[-1]).to(stats_dtype)
                shared.clear()
                shared[key] = (flat.T @ flat, x)  # keep x alive so its id stays unique
            grams[rel] += shared[key][0]

        hooks = [lin.register_forward_hook(lambda m, a, o, rel=rel: acc(m, a, o, rel)) for rel, lin in wanted.items()]
        outputs = []
        with torch.no_grad():
            for hidden, kw in inputs:
                outputs.append(_block_output(block(hidden, **kw)))
                shared.clear()
        for h in hooks:
            h.remove()
        for rel, lin in wanted.items():
            g = grams.pop(rel)
            if not torch.isfinite(g).all():
                raise EmlocError(f"non-finite activations entering {bprefix + rel} (dtype {dtype}); use --dtype float32")
            yield bprefix + rel, g
            del g  # not alive while the next block runs
        inputs = [(o, kw) for o, (_, kw) in zip(outputs, inputs)]
        to_meta(block)
        store.release()
