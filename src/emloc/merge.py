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
    acfg = _check_adapter(adapter)
    amanifest = read_manifest(adapter) or {}
    base_dir = resolve_model(base or amanifest.get("base") or acfg.get("base_model_name_or_path"))
    if amanifest.get("kind") == "corrected_adapter" and fingerprint(base_dir) != amanifest.get("base_fingerprint"):
        raise EmlocError(f"the adapter was corrected for a different base model than {base_dir}; pass the right --base")
    if amanifest.get("kind") == "adapter" and amanifest.get("trained_on_kind") == "emulator":
        raise EmlocError("this adapter was trained on an emulator; run `emloc correct` first and merge its output")
    out_path = check_output(output, overwrite, (base_dir, adapter))
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    pending = {m: None for m in _lora_modules(tensors)}
    prefix = "base_model.model."
    shards = weight_files(base_dir)
    renamed = WeightStore(base_dir).align(empty_model(load_config(base_dir))).model_names()
    with staged_output(out_path, overwrite, (base_dir, adapter)) as tmp:
        written: list[tuple[Path, list[str]]] = []
        chunk: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal chunk, size
            if chunk:
                path = tmp / f"part-{len(written):05d}.safetensors"
                save_finite(chunk, path)
                written.append((path, list(chunk)))
                fault_point("merge_shard", len(written))
            chunk, size = {}, 0

        for shard in tqdm(shards, desc="merging", unit="shard"):
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
                chunk[key] = t
                size += t.numel() * t.element_size()
                if size >= max_shard_bytes:
                    flush()
                    # reopening drops the pages of the memory map read so far from resident memory
                    f = open_safetensors(shard)
            del f
        flush()
        n = len(written)
        weight_map = {}
        stem = family_of(load_config(base_dir)).weights_stem  # what the model's library loads: model-*, diffusion_pytorch_model-*
        for i, (path, keys) in enumerate(written, 1):
            final = f"{stem}-{i:05d}-of-{n:05d}.safetensors"
            path.rename(tmp / final)
            weight_map.update({k: final for k in keys})
        write_json(tmp / f"{stem}.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
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
