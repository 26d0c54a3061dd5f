"""The block-streaming engine: every pass over a base model, one transformer block at a time.

`emloc build` (the SVD emulator and both baselines) and the statistics of `emloc correct --mode
weighted` run the base model the same way, inside the memory of one block:

1. the model skeleton is built on the meta device (no memory) and everything outside the blocks
   (embeddings, final norm, head) is read from the safetensors shards;
2. the calibration records run through the embeddings in padded batches, and a pre-hook on block 0
   captures each batch's hidden states and block arguments (attention mask, positions, rotary
   tables), then stops the forward;
3. block by block: its weights are read, the captured batches run through it while forward hooks
   accumulate the statistics the caller asked for (over real tokens only, padding excluded), its
   outputs become the next block's inputs, and it goes back to the meta device.

Statistics (unnormalised sums over the calibration tokens, in `stats_dtype`, on the compute device):
`INPUT_GRAM` G = sum x x^T (n x n), `OUTPUT_GRAM` sum y y^T of the bias-free output y = W x
(m x m, = W G W^T), `INPUT_SUMSQ` diag(G) (n), or any callable `fn(x, y)`, called on every batch
with the real tokens' inputs (t x n) and bias-free outputs (t x m) in `stats_dtype`, for
statistics of a caller's own. Every request also gets the token count and trace(G). Layers that
read the same tensor (q/k/v, gate/up) share one input product.

Records are right-padded: with causal attention a real token never attends to a later (padded)
position, so its activations are those of the record run alone; batching only changes float
rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import EmlocError
from .images import collate_extras
from .families import family_of
from .models import WeightStore, block_linears, empty_model, load_config, materialize, to_meta

if TYPE_CHECKING:
    from .data import Example

INPUT_GRAM = "input_gram"
OUTPUT_GRAM = "output_gram"
INPUT_SUMSQ = "input_sumsq"
STATISTICS = (INPUT_GRAM, OUTPUT_GRAM, INPUT_SUMSQ)
BATCH_TOKENS = 4096  # padded tokens per calibration forward (the default of every stage that streams)


@dataclass
class LayerStats:
    """Statistics of one linear layer's activations on the calibration tokens (sums, not means).

    Attributes:
        tokens: real (unpadded) tokens seen.
        input_trace: trace(G) = sum ||x||^2, a 0-d tensor.
        input_gram: G = sum x x^T (n x n), if asked for.
        output_gram: sum (Wx)(Wx)^T (m x m), bias removed, if asked for.
        input_sumsq: diag(G) (n), if asked for.
    """

    tokens: int = 0
    input_trace: torch.Tensor | None = None
    input_gram: torch.Tensor | None = None
    output_gram: torch.Tensor | None = None
    input_sumsq: torch.Tensor | None = None


@dataclass
class _Batch:
    hidden: torch.Tensor  # B x T x d, the block's input
    kwargs: dict[str, Any]  # the block's other arguments (masks, positions, rotary tables)
    mask: torch.Tensor | None  # (B*T,) bool, real tokens; None when the batch has no padding
    args: tuple = ()  # the block's positional arguments after the hidden states (e.g. a vision layer's mask)
    state: dict[str, Any] | None = None  # what a family's glue carries between blocks (a UNet's skip connections)


def batches_by_length(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Group record indices, longest first, so that each group's padded size is <= `batch_tokens`.

    A record longer than `batch_tokens` forms a group of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class _Captured(Exception):
    """Raised by the pre-hook on block 0 once its inputs are stored."""


RAW = ("*",)  # `block_outputs` of a family with glue: the block's output as it is, for the glue to read


def _block_output(out: Any, names: tuple[str, ...] | None = None) -> Any:
    """What of a block's output the next block needs: the hidden states, or with `names` the whole tuple."""
    if names == RAW:
        return out
    if names is not None:
        return tuple(out)
    return out[0] if isinstance(out, (tuple, list)) else out


def _carry(out: Any, batch: _Batch, names: tuple[str, ...] | None) -> _Batch:
    """The next block's inputs: the block's output as hidden states; or each named output entry as
    the next block's argument of that name (`hidden_states` positionally)."""
    if names is None:
        return _Batch(out, batch.kwargs, batch.mask, batch.args)
    kwargs, hidden = dict(batch.kwargs), None
    for name, value in zip(names, out):
        if name == "hidden_states":
            hidden = value
        else:
            kwargs[name] = value
    return _Batch(hidden, kwargs, batch.mask, batch.args)


class StreamedModel:
    """A base model whose blocks are read one at a time from its safetensors shards.

    Building it costs no memory (meta skeleton, safetensors headers only), so callers can plan and
    validate from `blocks` before any weight is read.

    Attributes:
        folder: the model folder.
        model: the meta skeleton (non-block weights become real after `load_outside`).
        store: the weight reader.
        stacks: (dotted name, ModuleList) of each block stack, in the order they run (one for a
            language model; a Flux denoiser's double- then single-stream blocks).
        blocks: every block of every stack, in order (meta); a pass walks them all.
        prefixes: the full name prefix of each block's modules, e.g. `model.layers.3.`.
        blocks_name: the stacks' names, comma-separated (for manifests and messages).
        prefix: the first stack's name + "." (the only one for a language model).
    """

    def __init__(self, folder: Path, blocks: str | None = None) -> None:
        self.folder = Path(folder)
        config = load_config(self.folder)
        self.model = empty_model(config)
        self.model.eval()
        self.store = WeightStore(self.folder).align(self.model)
        family = family_of(config)
        if blocks is None:
            self.stacks = family.find_stacks(self.model)
        else:  # another stack, e.g. a vision tower's
            self.stacks = [(blocks, self.model.get_submodule(blocks))]
        # a stack is a ModuleList of blocks, or one module that is a block itself (a UNet's mid block)
        self.blocks = [b for _, stack in self.stacks for b in (stack if isinstance(stack, nn.ModuleList) else [stack])]
        self.prefixes = [p for name, stack in self.stacks for p in
                         ([f"{name}.{i}." for i in range(len(stack))] if isinstance(stack, nn.ModuleList) else [f"{name}."])]
        self.blocks_name = ",".join(name for name, _ in self.stacks)
        self.prefix = self.stacks[0][0] + "."
        # a family's glue builds each block's inputs from the previous block's raw output (see `Family.glue`)
        self.glue = family.make_glue() if blocks is None else None
        self.block_outputs = RAW if self.glue is not None else (family.block_outputs if blocks is None else None)
        # the records' real-token mask applies to a stack that runs on the token sequence, not to a
        # vision tower's (images x patches, never padded)
        self.token_mask = blocks is None

    def inside(self, name: str) -> bool:
        """Whether the module `name` lies inside one of the streamed blocks."""
        return name.startswith(tuple(f"{n}." for n, _ in self.stacks))

    def block_index(self, name: str) -> int:
        """The position (in `blocks`) of the block holding module `name`."""
        return next(i for i, p in enumerate(self.prefixes) if name.startswith(p))

    def load_outside(self, device: torch.device, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> None:
        """Read every weight outside the blocks (embeddings, final norm, head) onto `device`, except
        those under the dotted prefixes `skip` (modules the pass never reaches)."""
        left_out = (*(f"{n}." for n, _ in self.stacks), *(p.rstrip(".") + "." for p in skip))
        materialize(self.model, "", self.store, device, dtype, keep=lambda name: not name.startswith(left_out))
        self.store.release()
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def capture(self, records: "list[list[int]] | list[Example] | list[dict[str, torch.Tensor]]", device: torch.device,
                batch_tokens: int = BATCH_TOKENS) -> list[_Batch]:
        """Run the records (token ids, or `Example`s whose `extras` such as `pixel_values` go to the
        model too) through everything before block 0 in padded batches; return block 0's inputs."""
        store: list[_Batch] = []

        def hook(_mod, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            store.append(_Batch(hidden, kwargs, None, tuple(args[1:])))
            raise _Captured

        if records and isinstance(records[0], dict):  # ready batches of model inputs (a denoiser's)
            return self._capture_batches(records, device, store, hook)  # type: ignore[arg-type]
        ids = [r if isinstance(r, list) else r.input_ids for r in records]
        extras = [None if isinstance(r, list) else r.extras for r in records]
        groups = batches_by_length([len(i) for i in ids], batch_tokens)
        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for group in tqdm(groups, desc="capturing block inputs", leave=False):
                    t = len(ids[group[0]])
                    x = torch.zeros(len(group), t, dtype=torch.long)
                    mask = torch.zeros(len(group), t, dtype=torch.long)
                    for r, i in enumerate(group):
                        x[r, : len(ids[i])] = torch.tensor(ids[i])
                        mask[r, : len(ids[i])] = 1
                    more = {k: v.to(device) for k, v in collate_extras([extras[i] for i in group]).items()}
                    n = len(store)
                    try:
                        self.model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False, **more)
                    except _Captured:
                        pass
                    if len(store) != n + 1:
                        raise EmlocError("the model never reached its first transformer block; emloc cannot calibrate this architecture")
                    if self.token_mask and not mask.all():
                        store[-1].mask = mask.reshape(-1).bool().to(device)
        finally:
            handle.remove()
        return store

    def _capture_batches(self, batches: list[dict[str, torch.Tensor]], device: torch.device, store: list[_Batch],
                         hook: Any) -> list[_Batch]:
        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in tqdm(batches, desc="capturing block inputs", leave=False):
                    n = len(store)
                    try:
                        self.model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
                    except _Captured:
                        pass
                    if len(store) != n + 1:
                        raise EmlocError("the model never reached its first block; emloc cannot calibrate this architecture")
                    if self.glue is not None:
                        store[-1] = self.glue.start(store[-1], batch)
        finally:
            handle.remove()
        return store

    def passes(self, ids: "list[list[int]] | list[Example]", device: torch.device, dtype: torch.dtype, *,
               stats_dtype: torch.dtype = torch.float64, batch_tokens: int = BATCH_TOKENS,
               last: int | None = None, sequential: bool = False, desc: str = "blocks") -> Iterator["BlockPass"]:
        """Stream blocks 0..`last` (default: all) over the calibration records `ids`.

        Yields one `BlockPass` per block, with the block's weights loaded; the caller may call
        `run` to collect statistics and may replace the block's layers. When the caller moves on,
        the block's outputs on the original weights become the next inputs (with `sequential`, the
        outputs of the block as the caller left it), and the block is freed. `load_outside` must
        have been called.
        """
        inputs = self.capture(ids, device, batch_tokens)
        last = len(self.blocks) - 1 if last is None else last
        for i in tqdm(range(last + 1), desc=desc, unit="block"):
            block, bprefix = self.blocks[i], self.prefixes[i]
            materialize(block, bprefix, self.store, device, dtype)
            step = BlockPass(i, bprefix, block, inputs, stats_dtype, names=self.block_outputs)
            yield step
            if i < last:
                if sequential or step.outputs is None:
                    step.outputs = step.forward()
                inputs = ([self.glue.carry(o, b, self.blocks[i + 1]) for o, b in zip(step.outputs, inputs)] if self.glue is not None
                          else [_carry(o, b, self.block_outputs) for o, b in zip(step.outputs, inputs)])
            step.outputs = None
            to_meta(block)
            self.store.release()


@dataclass
class BlockPass:
    """One block of a streamed pass, its weights loaded.

    Attributes:
        index: block number.
        prefix: full name prefix of the block's modules, e.g. `model.layers.3.`.
        block: the block module (real weights on the compute device).
    """

    index: int
    prefix: str
    block: nn.Module
    inputs: list[_Batch] = field(repr=False)
    stats_dtype: torch.dtype = torch.float64
    outputs: list[Any] | None = field(default=None, repr=False)
    names: tuple[str, ...] | None = None  # the family's `block_outputs`

    def forward(self) -> list[Any]:
        """The block's outputs on every calibration batch."""
        with torch.no_grad():
            return [_block_output(self.block(b.hidden, *b.args, **b.kwargs), self.names) for b in self.inputs]

    def run(self, requests: dict[str, set[Any] | tuple[Any, ...]]) -> dict[str, LayerStats]:
        """Run the block on the calibration batches and return the statistics asked for.

        Args:
            requests: layer name relative to the block (e.g. `mlp.down_proj`) -> statistics
                (`INPUT_GRAM`, `OUTPUT_GRAM`, `INPUT_SUMSQ`, or callables `fn(x, y)`, see the module doc).

        Returns:
            layer name -> `LayerStats`. The block's outputs are kept as the next block's inputs.
        """
        linears = dict(block_linears(self.block))
        stats = {rel: LayerStats() for rel in requests}
        current: dict[str, torch.Tensor | None] = {}  # the real-token mask of the batch being run
        shared: dict[int, dict[str, Any]] = {}  # per input tensor: its real rows and their products
        sd = self.stats_dtype

        def inputs_of(x: torch.Tensor, kinds) -> dict[str, Any]:
            """q/k/v (gate/up) read one tensor: one conversion, one product for all of them."""
            entry = shared.get(id(x))
            if entry is None:
                mask = current["mask"]
                flat = x.detach().reshape(-1, x.shape[-1])
                # a layer fed a subset of the tokens (e.g. routed experts) cannot be masked; it sees padding too
                xs = (flat[mask] if mask is not None and flat.shape[0] == mask.numel() else flat).to(sd)
                entry = shared[id(x)] = {"x": x, "xs": xs, "trace": torch.linalg.vector_norm(xs).square()}
            if INPUT_GRAM in kinds and "gram" not in entry:
                entry["gram"] = entry["xs"].T @ entry["xs"]
            if INPUT_SUMSQ in kinds and "sumsq" not in entry:
                entry["sumsq"] = entry["xs"].square().sum(0)
            return entry

        def acc(lin: nn.Linear, x: torch.Tensor, out: torch.Tensor, rel: str, kinds) -> None:
            entry = inputs_of(x, kinds)
            st = stats[rel]
            st.tokens += entry["xs"].shape[0]
            st.input_trace = entry["trace"].clone() if st.input_trace is None else st.input_trace.add_(entry["trace"])
            if INPUT_GRAM in kinds:
                st.input_gram = entry["gram"].clone() if st.input_gram is None else st.input_gram.add_(entry["gram"])
            if INPUT_SUMSQ in kinds:
                st.input_sumsq = entry["sumsq"].clone() if st.input_sumsq is None else st.input_sumsq.add_(entry["sumsq"])
            callbacks = [k for k in kinds if callable(k)]
            if OUTPUT_GRAM in kinds or callbacks:
                mask = current["mask"]
                y = out.detach().reshape(-1, out.shape[-1])
                ys = (y[mask] if mask is not None and y.shape[0] == mask.numel() else y).to(sd)
                if lin.bias is not None:
                    ys = ys - lin.bias.to(sd)
                if OUTPUT_GRAM in kinds:
                    g = ys.T @ ys
                    st.output_gram = g if st.output_gram is None else st.output_gram.add_(g)
                for fn in callbacks:
                    fn(entry["xs"], ys)

        hooks = []
        for rel, kinds in requests.items():
            bad = {k for k in kinds if not callable(k)} - set(STATISTICS)
            if bad or rel not in linears:
                raise ValueError(f"cannot collect {sorted(bad) or kinds} for {self.prefix}{rel}")
            lin = linears[rel]
            hooks.append(lin.register_forward_hook(lambda m, a, o, rel=rel, k=kinds: acc(m, a[0], o, rel, k)))
        outputs = []
        try:
            with torch.no_grad():
                for b in self.inputs:
                    current["mask"] = b.mask
                    outputs.append(_block_output(self.block(b.hidden, *b.args, **b.kwargs), self.names))
                    shared.clear()
        finally:
            for h in hooks:
                h.remove()
        self.outputs = outputs
        for rel, st in stats.items():
            # a Gram is finite iff its diagonal is (|G_ij| <= sqrt(G_ii G_jj)): checking traces suffices
            sums = [t.sum() if t.dim() == 1 else torch.trace(t) for t in (st.output_gram, st.input_sumsq) if t is not None]
            for t in [st.input_trace, *sums]:
                if t is not None and not torch.isfinite(t):
                    raise EmlocError(f"non-finite activations entering {self.prefix}{rel}; use --dtype float32 or check the data")
        return stats
