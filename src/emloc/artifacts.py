"""Artifact folders: staged writes, manifests, fingerprints and run summaries.

Every stage writes a folder. It is assembled under a temporary sibling name and renamed into place
only when complete, with `manifest.json` written last, so an interrupted run never leaves a folder
that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import EmlocError

MANIFEST = "manifest.json"
MEASURE_THRESHOLD = 128 * 1024  # bytes: the setting under which peak RSS is the memory in use (`return_freed_memory`)


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output folder unless `overwrite` is set."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise EmlocError(f"output folder {path} exists and is not empty; choose another path or pass --overwrite")


def check_distinct(output: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is, contains or lies inside one of the `inputs` (files or folders).

    Replacing such an output (`--overwrite`) would delete or alter an input; the check runs before any I/O.
    """
    out = Path(output).expanduser().resolve()
    for item in inputs:
        if item is None or not Path(str(item)).expanduser().exists():
            continue  # a packaged model name, or an input that is checked (and reported) elsewhere
        src = Path(str(item)).expanduser().resolve()
        if out == src:
            raise EmlocError(f"the output {out} is the input {src}; choose a new output path")
        if out in src.parents:
            raise EmlocError(f"the output {out} contains the input {src}; choose an output outside it")
        if src in out.parents:
            raise EmlocError(f"the output {out} lies inside the input {src}; choose an output outside it")


def check_output(path: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """All checks of an output path, before any work: not an input, and empty unless `overwrite`. Returns it resolved."""
    out = Path(path).expanduser().resolve()
    check_distinct(out, inputs)
    check_output_dir(out, overwrite)
    return out


@contextlib.contextmanager
def staged_output(path: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` when the block finishes without error.

    On error the temporary folder is removed, and an existing `path` is left untouched. `inputs` are refused
    as outputs (see `check_distinct`).
    """
    path = check_output(path, overwrite, inputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        raise EmlocError(f"cannot create output folder next to {path}: {exc.strerror}; check permissions and free space") from None
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise EmlocError(f"disk full while writing {path}; free space or choose another output folder") from None
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise EmlocError(f"permission denied while writing {path}: {exc.filename}; choose a writable output folder") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def check_output_file(path: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """All checks of an output file, before any work: not an input, not a folder, new unless `overwrite`."""
    path = Path(path).expanduser().resolve()
    check_distinct(path, inputs)
    if path.is_dir():
        raise EmlocError(f"output {path} is a folder; give a file path")
    if path.exists() and not overwrite:
        raise EmlocError(f"output file {path} exists; choose another path or pass --overwrite")
    return path


@contextlib.contextmanager
def staged_file(path: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary file path that becomes `path` when the block finishes without error.

    Refuses an existing `path` unless `overwrite`, and any of `inputs` (see `check_distinct`).
    """
    path = check_output_file(path, overwrite, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        yield tmp
        tmp.replace(path)  # atomic on one file system
    finally:
        tmp.unlink(missing_ok=True)


def save_finite(tensors: dict[str, Any], path: Path) -> None:
    """`safetensors.save_file`, refusing any non-finite floating tensor (e.g. factors that overflowed in the cast)."""
    import torch
    from safetensors.torch import save_file

    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise EmlocError(f"{name} holds non-finite values; nothing was written (check the inputs' weights, "
                             "or use a wider --dtype)")
    save_file(tensors, path, metadata={"format": "pt"})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Remove temporary folders left for `path` by processes that were killed."""
    for p in path.parent.glob(f".{path.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, paths and tuples into plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not valid JSON
        return None
    return obj


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (adapter_config.json, ...), with a one-line error when it does not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EmlocError(f"{path} is not valid JSON ({exc}); restore the file") from None
    if not isinstance(data, dict):
        raise EmlocError(f"{path} does not hold a JSON object; restore the file")
    return data


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """Return the folder's manifest, or None if it has none."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        raise EmlocError(f"{p} is not valid JSON; the folder is damaged, rebuild it") from None


def versions() -> dict[str, str]:
    """Versions of the packages that decide numerical results."""
    out = {"python": platform.python_version()}
    for name in ("emloc", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except ImportError:
            pass
    return out


def fingerprint(folder: str | Path) -> str:
    """A cheap, content-based fingerprint of a model or adapter folder.

    Hashes the config and, for each safetensors file, its size, header (tensor names, shapes,
    offsets) and the first and last MiB of data. Reading whole multi-GB files just to compare
    identities would dominate small runs; this catches any re-save, re-build or different model.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    for name in ("config.json", "adapter_config.json"):
        p = folder / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    for p in sorted(folder.glob("*.safetensors")):
        size = p.stat().st_size
        h.update(p.name.encode())
        h.update(str(size).encode())
        with p.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 64 << 20)))
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started (or exec'd), in MB.

    On Linux this is the address space's high-water mark (VmHWM), not `ru_maxrss`: the latter
    carries over fork and exec, so a process started by a parent holding 8 GB reported at least
    8 GB (measured: a child of a parent holding 1 GiB read ru_maxrss 1037 MB, VmHWM 13 MB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / 1024 if sys.platform != "darwin" else rss / 2**20, 1)


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation, if any), in MB."""
    out = {"peak_rss_mb": peak_rss_mb()}
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except ImportError:
        pass
    return out


def return_freed_memory(default: int = 0) -> None:
    """Apply `EMLOC_MMAP_THRESHOLD` (bytes, else `default`; 0 keeps glibc's defaults) to this process.

    With a threshold, glibc maps every block above it on allocation and unmaps it on free, and trims
    the heap top eagerly, so peak RSS is the memory in use; with glibc's defaults freed tensors stay
    in the heap for reuse. On 2 CPU cores, `MEASURE_THRESHOLD` (128 KiB) made LoRA training 1.2-2.4x
    slower on SmolLM2-135M and Qwen2.5-Coder-0.5B (every fresh page is faulted and zeroed) and cut
    its peak RSS by 1.3-3.2 GB (README, "Speed"). The stage commands default to speed; `emloc run` and
    benchmarks/memory.py, which report peaks against inference, use `MEASURE_THRESHOLD`.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        threshold = int(os.environ.get("EMLOC_MMAP_THRESHOLD", default))
        if threshold <= 0:
            return
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, threshold)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError, ValueError):
        pass


class Stopwatch:
    """Wall time since construction, plus a one-line summary for the end of a command."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def summary(self, what: str, output: Path | str | None) -> str:
        mem = peak_memory_mb()
        parts = [f"{what} done in {self.seconds:.1f} s", f"peak RSS {mem['peak_rss_mb'] / 1024:.2f} GB"]
        if "peak_cuda_allocated_mb" in mem:
            parts.append(f"peak CUDA {mem['peak_cuda_allocated_mb'] / 1024:.2f} GB")
        if output is not None:
            parts.append(f"-> {output}")
        return ", ".join(parts)


def legacy_order(fn: str, new: str) -> None:
    """Warn that a stage function was called with its arguments in the previous release's order."""
    import warnings

    warnings.warn(f"{fn}: positional arguments in the old order are deprecated and stop working in the next release; "
                  f"call {new}", FutureWarning, stacklevel=3)
