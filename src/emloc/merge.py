"""Merge a (corrected) LoRA adapter into the original model, one safetensors shard at a time."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .artifacts import (MANIFEST, Stopwatch, check_output, fingerprint, peak_memory_mb, read_manifest, save_finite, staged_output,
                        versions, write_json)
from .checkpoint import fault_point
from .correct import ADAPTER_WEIGHTS, _check_adapter, _lora_modules, scaling
from .errors import EmlocError
from .families import family_of
from .models import (WeightStore, copy_tokenizer_files, empty_model, load_config, open_safetensors, read_tensor, resolve_model,
                     weight_files)


MAX_SHARD_BYTES = 256 * 2**20


class _ShardWriter:
    """Collects tensors into output shards of about `max_bytes`, named like the model's library expects."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.written: list[tuple[Path, list[str]]] = []
        self.chunk: dict[str, torch.Tensor] = {}
        self.size = 0

    def add(self, key: str, t: torch.Tensor) -> bool:
        """Queue one tensor; True when that filled a shard and wrote it."""
        self.chunk[key] = t
        self.size += t.numel() * t.element_size()
        if self.size < self.max_bytes:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        if self.chunk:
            path = self.folder / f"part-{len(self.written):05d}.safetensors"
            save_finite(self.chunk, path)
            self.written.append((path, list(self.chunk)))
            fault_point("merge_shard", len(self.written))
        self.chunk, self.size = {}, 0

    def finish(self, stem: str) -> None:
        """Rename the parts `{stem}-0000i-of-0000n` and write their index."""
        self.flush()
        n = len(self.written)
        weight_map = {}
        for i, (path, keys) in enumerate(self.written, 1):
            final = f"{stem}-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update({k: final for k in keys})
        write_json(self.folder / f"{stem}.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})


def _base_for(base: str | Path | None, adapter: Path) -> tuple[dict, Path]:
    """The adapter's PEFT config and the base it merges into, refusing an uncorrected or mismatched adapter."""
    acfg = _check_adapter(adapter)
    amanifest = read_manifest(adapter) or {}
    base_dir = resolve_model(base or amanifest.get("base") or acfg.get("base_model_name_or_path"))
    if amanifest.get("kind") == "corrected_adapter" and fingerprint(base_dir) != amanifest.get("base_fingerprint"):
        raise EmlocError(f"the adapter was corrected for a different base model than {base_dir}; pass the right --base")
    if amanifest.get("kind") == "adapter" and amanifest.get("trained_on_kind") == "emulator":
        raise EmlocError("this adapter was trained on an emulator; run `emloc correct` first and merge its output")
    return acfg, base_dir


def merge_adapter(base: str | Path | None, adapter: str | Path, output: str | Path, overwrite: bool = False,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write `base` with `adapter` merged in: W <- W + s B A, in fp32, then cast back.

    Tensors are read one at a time and written in output shards of about `max_shard_bytes`, so
    memory stays at one output shard, whatever the size of the base's own shards.

    Args:
        base: the original model (default: the one named in the adapter's manifest or config).
        adapter: a PEFT LoRA adapter for `base` (typically the output of `emloc correct`).
        output: merged model folder to create (safetensors shards, config, tokenizer).
        overwrite: replace a non-empty `output`.

    Returns:
        The merged model folder, loadable with `AutoModelForCausalLM.from_pretrained`.
    """
    watch = Stopwatch()
    check_output(output, overwrite, (adapter, base))  # before any work; again below with the base found
    adapter = Path(adapter).expanduser().resolve()
    acfg, base_dir = _base_for(base, adapter)
    out_path = check_output(output, overwrite, (base_dir, adapter))
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    pending = {m: None for m in _lora_modules(tensors)}
    prefix = "base_model.model."
    renamed = WeightStore(base_dir).align(empty_model(load_config(base_dir))).model_names()
    with staged_output(out_path, overwrite, (base_dir, adapter)) as tmp:
        out = _ShardWriter(tmp, max_shard_bytes)
        for shard in tqdm(weight_files(base_dir), desc="merging", unit="shard"):
            f = open_safetensors(shard)
            for key in f.keys():
                t = read_tensor(f, shard, key)
                name = renamed.get(key, key)  # checkpoint names can differ from module names
                mod = name[: -len(".weight")] if name.endswith(".weight") else None
                if mod in pending:
                    a = tensors[f"{prefix}{mod}.lora_A.weight"].float()
                    b = tensors[f"{prefix}{mod}.lora_B.weight"].float()
                    t = (t.float() + scaling(acfg, mod, a.shape[0]) * (b @ a)).to(t.dtype)
                    del pending[mod]
                if out.add(key, t):
                    # reopening drops the pages of the memory map read so far from resident memory
                    f = open_safetensors(shard)
            del f
        # what the model's library loads: model-*, diffusion_pytorch_model-*
        out.finish(family_of(load_config(base_dir)).weights_stem)
        if pending:
            raise EmlocError(f"the adapter targets {next(iter(pending))}, which {base_dir} does not have; pass the right --base")
        shutil.copy2(base_dir / "config.json", tmp / "config.json")
        copy_tokenizer_files(base_dir, tmp)
        write_json(tmp / MANIFEST, {"kind": "merged", "base": str(base_dir), "base_fingerprint": fingerprint(base_dir),
                                    "adapter": str(adapter), "adapter_fingerprint": fingerprint(adapter),
                                    "merged_layers": len(_lora_modules(tensors)), "versions": versions(),
                                    "wall_seconds": round(watch.seconds, 1), **peak_memory_mb()})
    print(watch.summary("merge", out_path))
    return out_path
