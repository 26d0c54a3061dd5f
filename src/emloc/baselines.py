"""Baseline emulators that EMLoC is measured against, at the same parameter count.

- `layer-drop` (Offsite-Tuning style): keep the first and last two blocks and evenly spaced
  blocks in between, round(ratio x L) in all; LoRA trained on the kept blocks is plugged into the
  same blocks of the original.
- `channel-prune` (LoRAM / UPop style): in every block, keep the MLP's most important hidden
  channels (score: root-mean-square activation on the calibration data x norm of the output
  weight's column, as Wanda scores weights) and drop the rest, the same number per block, so
  that the block linears keep `ratio` of their parameters; LoRA trained on the pruned model is
  recovered to the full shapes by zero-filling the dropped channels.

Both write an emulator folder (`kind: emulator`, `method` in the manifest) that loads, trains and
evaluates like an SVD emulator; `emloc correct --mode none` maps its adapter back onto the
original (`to_original`). Weights are streamed block by block, each block written to its own
shard before the next is read; the pruning scores come from the same block-by-block calibration
pass as EMLoC's (`emloc.stream`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .artifacts import MANIFEST, Stopwatch, fingerprint, peak_memory_mb, save_finite, staged_output, versions, write_json
from .data import calibration_records
from .errors import EmlocError
from .quant import BASE_BYTES
from .families import family_of
from .models import (WeightStore, block_linears, copy_tokenizer_files, empty_model, find_blocks, load_config, load_processor, load_tokenizer,
                     parse_device, parse_dtype)
from .stream import INPUT_SUMSQ, StreamedModel

METHODS = ("layer-drop", "channel-prune")


def kept_blocks(n_blocks: int, ratio: float, edge: int = 2) -> list[int]:
    """Indices of the blocks a layer-drop emulator keeps: `edge` at each end, the rest evenly spaced."""
    k = max(1, min(n_blocks, round(ratio * n_blocks)))
    if k >= n_blocks:
        return list(range(n_blocks))
    if k == 1:  # the last block: some stacks end in a block of another shape (SD3's context-free last block)
        return [n_blocks - 1]
    edge = min(edge, k // 2)
    middle = list(range(edge, n_blocks - edge))
    inner = k - 2 * edge
    picked = [middle[round(i * (len(middle) - 1) / max(inner - 1, 1))] for i in range(inner)] if inner > 0 else []
    return sorted(set(range(edge)) | set(picked) | set(range(n_blocks - edge, n_blocks)))


def mlp_layers(block: torch.nn.Module) -> tuple[list[str], str]:
    """(linears that produce the MLP's hidden channels, the linear that consumes them), found by shape.

    The consumer is the block linear with the widest input; the producers are those whose output
    width equals it (gate and up in Llama-style MLPs, dense_h_to_4h in GPT-NeoX).
    """
    lins = dict(block_linears(block))
    consumer = max(lins, key=lambda n: lins[n].in_features)
    width = lins[consumer].in_features
    producers = [n for n, lin in lins.items() if lin.out_features == width]
    if not producers or any(lins[n].in_features == width for n in producers):
        raise EmlocError("channel pruning needs an MLP of separate input/output linears (found none by shape); "
                         "use --method svd for this architecture")
    return producers, consumer


class _ShardWriter:
    """Writes an emulator folder's weights shard by shard, so a build holds one block at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.weight_map, self.params = folder, {}, 0

    def __call__(self, fname: str, tensors: dict[str, torch.Tensor]) -> None:
        save_finite(tensors, self.folder / fname)
        self.weight_map.update({k: fname for k in tensors})
        self.params += sum(v.numel() for v in tensors.values())

    def finish(self, base_dir: Path, config: Any, manifest: dict[str, Any]) -> None:
        write_json(self.folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": self.weight_map})
        if isinstance(config, dict):  # a diffusers config
            write_json(self.folder / "config.json", dict(config))
        else:
            config.save_pretrained(self.folder)
        copy_tokenizer_files(base_dir, self.folder)
        if (base_dir / "generation_config.json").is_file():
            shutil.copy2(base_dir / "generation_config.json", self.folder / "generation_config.json")
        manifest["params"]["emulator"] = self.params
        manifest["fingerprint"] = fingerprint(self.folder)
        write_json(self.folder / MANIFEST, manifest)


def build_baseline(method: str, base_dir: Path, calibration: Path, output: Path, cfg: Any, overwrite: bool) -> Path:
    """Build a `layer-drop` or `channel-prune` emulator of `base_dir` keeping `cfg.ratio` of the block linears.

    Each kept (or pruned) block is written to its own shard as soon as it is ready and released, so
    the build holds one block of weights at a time (plus, for channel-prune, one block's Grams).

    Args:
        method: `layer-drop` or `channel-prune`.
        base_dir: the original model's folder.
        calibration: JSONL records (channel-prune scores channels on them).
        output: emulator folder to create.
        cfg: the `EmulatorConfig` (ratio must be one number; samples, max_length, seed, device, dtype).
        overwrite: replace a non-empty output.
    """
    if method not in METHODS:
        raise EmlocError(f"unknown emulator method {method!r}; use svd, {', '.join(METHODS)}")
    if not isinstance(cfg.ratio, (int, float)) or not 0 < cfg.ratio <= 1:
        raise EmlocError(f"--method {method} takes one ratio in (0, 1] (got {cfg.ratio!r})")
    watch = Stopwatch()
    config = load_config(base_dir)
    model = empty_model(config)
    store = WeightStore(base_dir).align(model)
    blocks_name, blocks = find_blocks(model)
    prefix = blocks_name + "."
    names = [n for n, _ in model.named_parameters()]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if method == "channel-prune":
        producers, consumer = mlp_layers(blocks[0])
        if not hasattr(text, "intermediate_size"):
            raise EmlocError(f"{config.model_type} has no intermediate_size in its config; channel pruning cannot resize it")
        k = _channels_kept(blocks[0], producers, consumer, float(cfg.ratio))
    family = family_of(config)
    stacks = family.find_stacks(model) if method == "layer-drop" else [(blocks_name, blocks)]
    if method == "layer-drop" and (len(family.stack_lengths) != len(stacks)
                                   or not all(isinstance(b, torch.nn.ModuleList) for _, b in stacks)):
        raise EmlocError(f"layer drop cannot shorten a {family.name} model's block stacks (its blocks differ in shape); "
                         "use --method svd")
    manifest: dict[str, Any] = {
        "kind": "emulator", "method": method, "base": str(base_dir), "base_fingerprint": fingerprint(base_dir),
        "blocks": ",".join(n for n, _ in stacks), "config": cfg, "calibration": {"file": str(calibration), "samples": cfg.samples},
        "params": {"base": sum(p.numel() for p in model.parameters())}, "layers": {}, "versions": versions()}
    with staged_output(output, overwrite, (base_dir, calibration)) as tmp:
        emit = _ShardWriter(tmp)
        if method == "layer-drop":
            maps = _drop_blocks(stacks, family.stack_lengths, text, store, names, float(cfg.ratio), emit)
            # one stack: {kept j: original i}, as before; several: per stack
            manifest["block_map"] = maps if len(maps) > 1 else next(iter(maps.values()))
            manifest["bytes"] = _kept_bytes(stacks, maps)
        else:
            channels = _prune_blocks(base_dir, calibration, cfg, store, names, prefix, len(blocks), producers, consumer, k, emit)
            text.intermediate_size = k
            manifest.update(mlp_producers=producers, mlp_consumer=consumer, mlp_width=dict(block_linears(blocks[0]))[consumer].in_features,
                            channels_kept=k, channels=channels)
        inside = tuple(f"{n}." for n, _ in stacks)
        emit("rest.safetensors", {n: store.get(n).contiguous() for n in names if not n.startswith(inside)})
        store.release()
        manifest.update(wall_seconds=round(watch.seconds, 1), **peak_memory_mb())
        emit.finish(base_dir, config, manifest)
    print(watch.summary("build", output))
    return output


def _drop_blocks(stacks: list[tuple[str, torch.nn.ModuleList]], lengths: tuple[str, ...], text: Any, store: WeightStore,
                 names: list[str], ratio: float, emit: _ShardWriter) -> dict[str, dict[str, int]]:
    """Copy the kept blocks of every stack (renumbered from 0), shorten the config; return stack -> {kept j: original i}."""
    block_map: dict[str, dict[str, int]] = {}
    shard = 0
    for (name, blocks), length in zip(stacks, lengths):
        keep, p = kept_blocks(len(blocks), ratio), f"{name}."
        for j, i in enumerate(tqdm(keep, desc=f"copying kept blocks of {name}", unit="block")):
            emit(f"block-{shard:05d}.safetensors", {f"{p}{j}.{n[len(f'{p}{i}.'):]}": store.get(n).contiguous()
                                                    for n in names if n.startswith(f"{p}{i}.")})
            shard += 1
            store.release()
        if isinstance(text, dict):  # a diffusers config
            text[length] = len(keep)
        else:
            setattr(text, length, len(keep))
            if isinstance(getattr(text, "layer_types", None), list):
                text.layer_types = [text.layer_types[i] for i in keep]
        block_map[name] = {str(j): i for j, i in enumerate(keep)}
    return block_map


def _kept_bytes(stacks: list[tuple[str, torch.nn.ModuleList]], maps: dict[str, dict[str, int]]) -> dict[str, float]:
    """The block linears' bytes (counted in bfloat16) of the original and of the kept blocks, and their fraction
    (per-stack rounding can keep more than `ratio`: e.g. a stack of one block keeps it)."""
    size = {name: [BASE_BYTES * sum(lin.weight.numel() for _, lin in block_linears(b)) for b in blocks] for name, blocks in stacks}
    total = sum(sum(v) for v in size.values())
    kept = sum(size[name][i] for name, m in maps.items() for i in m.values())
    return {"block_linears_bf16": total, "emulator_block_linears": kept, "fraction": kept / max(total, 1)}


def _channels_kept(block: torch.nn.Module, producers: list[str], consumer: str, ratio: float) -> int:
    """MLP channels per block such that the block linears keep `ratio` of their parameters."""
    lins = dict(block_linears(block))
    width, d_total = lins[consumer].in_features, sum(lin.in_features * lin.out_features for lin in lins.values())
    per_channel = sum(lins[n].in_features for n in producers) + lins[consumer].out_features
    other = d_total - per_channel * width
    if ratio * d_total <= other:
        raise EmlocError(f"ratio {ratio} is below what pruning only MLP channels can reach "
                         f"({other / d_total:.2f} of the block linears is attention); use a larger ratio")
    return int(max(1, min(width, (ratio * d_total - other) // per_channel)))


def _prune_blocks(base_dir: Path, calibration: Path, cfg: Any, store: WeightStore, names: list[str], prefix: str,
                  n_blocks: int, producers: list[str], consumer: str, k: int, emit: _ShardWriter) -> dict[str, list[int]]:
    """Score, prune and write every block as the calibration pass streams past; return the kept channels."""
    tok = load_tokenizer(base_dir)
    ids = calibration_records(calibration, tok, cfg.samples, cfg.max_length, cfg.seed, cfg.calibration_tokens,
                              load_processor(base_dir))
    device = parse_device(cfg.device)
    dtype = parse_dtype(cfg.dtype, device)
    stream = StreamedModel(base_dir)
    stream.load_outside(device, dtype)
    channels: dict[str, list[int]] = {}
    for step in stream.passes(ids, device, dtype, stats_dtype=torch.float64, batch_tokens=cfg.batch_tokens,
                              last=n_blocks - 1, desc="pruning MLP channels"):
        bp = step.prefix
        sumsq = step.run({consumer: (INPUT_SUMSQ,)})[consumer].input_sumsq.cpu()
        w_out = store.get(bp + consumer + ".weight").double()
        # Wanda-style: RMS input activation of the channel x norm of the weights that read it
        score = sumsq.clamp(min=0).sqrt() * w_out.norm(dim=0)
        idx = torch.topk(score, k).indices.sort().values
        channels[bp] = idx.tolist()
        t = {}
        for n in names:
            if not n.startswith(bp):
                continue
            rel = n[len(bp):]
            v = store.get(n)
            if any(rel.startswith(p + ".") for p in producers):
                v = v[idx]  # rows (and biases) of the channel producers
            elif rel == consumer + ".weight":
                v = v[:, idx]
            t[n] = v.contiguous()
        emit(f"block-{step.index:05d}.safetensors", t)
        del t
        store.release()
    return channels


def to_original(tensors: dict[str, torch.Tensor], emanifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Map a LoRA trained on a baseline emulator onto the original model's names and shapes.

    layer-drop: rename block j of the emulator to the original block it copies. channel-prune:
    zero-fill the dropped channels (rows of the producers' lora_B, columns of the consumer's lora_A),
    so the adapter's update is zero on channels the emulator did not have.
    """
    method = emanifest.get("method")
    if method == "layer-drop":
        return _undrop(tensors, emanifest)
    prefix = emanifest["blocks"] + "."
    pat = re.compile(rf"^(base_model\.model\.)?{re.escape(prefix)}(\d+)\.(.*)$")
    out: dict[str, torch.Tensor] = {}
    for key, v in tensors.items():
        m = pat.match(key)
        if m is None:
            out[key] = v
            continue
        idx, rel = int(m.group(2)), m.group(3)
        kept = torch.tensor(emanifest["channels"][f"{prefix}{idx}."])
        if any(rel.startswith(p + ".lora_B") for p in emanifest["mlp_producers"]):
            full = torch.zeros(emanifest["mlp_width"], v.shape[1], dtype=v.dtype)
            full[kept] = v
            v = full
        elif rel.startswith(emanifest["mlp_consumer"] + ".lora_A"):
            full = torch.zeros(v.shape[0], emanifest["mlp_width"], dtype=v.dtype)
            full[:, kept] = v
            v = full
        out[key] = v
    return out



def _undrop(tensors: dict[str, torch.Tensor], emanifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A layer-drop emulator's LoRA under the original's block numbers, stack by stack."""
    maps = emanifest["block_map"]
    if all(isinstance(v, int) for v in maps.values()):  # one stack, as earlier versions recorded it
        maps = {emanifest["blocks"]: maps}
    pats = [(name, m, re.compile(rf"^(base_model\.model\.)?{re.escape(name)}\.(\d+)\.(.*)$")) for name, m in maps.items()]
    out: dict[str, torch.Tensor] = {}
    for key, v in tensors.items():
        for name, m, pat in pats:
            hit = pat.match(key)
            if hit:
                key = f"{hit.group(1) or ''}{name}.{m[hit.group(2)]}.{hit.group(3)}"
                break
        out[key] = v
    return out
