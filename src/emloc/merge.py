"""Merge a (corrected) LoRA adapter into the original model, one safetensors shard at a time."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .artifacts import MANIFEST, Stopwatch, fingerprint, peak_memory_mb, read_manifest, staged_output, versions, write_json
from .correct import ADAPTER_WEIGHTS, _check_adapter, _lora_modules, scaling
from .checkpoint import fault_point
from .errors import EmlocError
from .models import WeightStore, copy_tokenizer_files, empty_model, load_config, resolve_model


def merge_adapter(base: str | Path | None, adapter: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write `base` with `adapter` merged in: W <- W + s B A, in fp32, then cast back.

    Only one shard of the base is in memory at a time.

    Args:
        base: the original model (default: the one named in the adapter's manifest or config).
        adapter: a PEFT LoRA adapter for `base` (typically the output of `emloc correct`).
        output: merged model folder to create (safetensors shards, config, tokenizer).
        overwrite: replace a non-empty `output`.

    Returns:
        The merged model folder, loadable with `AutoModelForCausalLM.from_pretrained`.
    """
    watch = Stopwatch()
    adapter = Path(adapter).expanduser().resolve()
    if not adapter.is_dir():
        raise EmlocError(f"adapter folder {adapter} does not exist")
    acfg = _check_adapter(adapter)
    amanifest = read_manifest(adapter) or {}
    base_dir = resolve_model(base or amanifest.get("base") or acfg.get("base_model_name_or_path"))
    if amanifest.get("kind") == "corrected_adapter" and fingerprint(base_dir) != amanifest.get("base_fingerprint"):
        raise EmlocError(f"the adapter was corrected for a different base model than {base_dir}; pass the right --base")
    if amanifest.get("kind") == "adapter" and amanifest.get("trained_on_kind") == "emulator":
        raise EmlocError("this adapter was trained on an emulator; run `emloc correct` first and merge its output")
    out_path = Path(output).expanduser().resolve()
    if out_path in (base_dir, adapter):
        raise EmlocError("the output folder is one of the inputs; choose a new folder")
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    pending = {m: None for m in _lora_modules(tensors)}
    prefix = "base_model.model."
    shards = sorted(base_dir.glob("*.safetensors"))
    renamed = WeightStore(base_dir).align(empty_model(load_config(base_dir))).model_names()
    with staged_output(out_path, overwrite) as tmp:
        for shard in tqdm(shards, desc="merging", unit="shard"):
            with safe_open(shard, "pt") as f:
                meta = f.metadata() or {"format": "pt"}
                out = {k: f.get_tensor(k) for k in f.keys()}
            for key in list(out):
                name = renamed.get(key, key)  # checkpoint names can differ from module names
                mod = name[: -len(".weight")] if name.endswith(".weight") else None
                if mod not in pending:
                    continue
                a = tensors[f"{prefix}{mod}.lora_A.weight"].float()
                b = tensors[f"{prefix}{mod}.lora_B.weight"].float()
                w = out[key]
                out[key] = (w.float() + scaling(acfg, mod, a.shape[0]) * (b @ a)).to(w.dtype)
                del pending[mod]
            save_file(out, tmp / shard.name, metadata=meta)
            del out
            fault_point("merge_shard", shards.index(shard) + 1)
        if pending:
            raise EmlocError(f"the adapter targets {next(iter(pending))}, which {base_dir} does not have; pass the right --base")
        for name in ("config.json", "model.safetensors.index.json"):
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
        copy_tokenizer_files(base_dir, tmp)
        write_json(tmp / MANIFEST, {"kind": "merged", "base": str(base_dir), "base_fingerprint": fingerprint(base_dir),
                                    "adapter": str(adapter), "adapter_fingerprint": fingerprint(adapter),
                                    "merged_layers": len(_lora_modules(tensors)), "versions": versions(),
                                    "wall_seconds": round(watch.seconds, 1), **peak_memory_mb()})
    print(watch.summary("merge", out_path))
    return out_path
