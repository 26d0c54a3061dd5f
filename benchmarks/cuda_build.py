"""`emloc build` on a GPU for a large config-built checkpoint: wall time and peak memory beside `emloc plan`.

    python benchmarks/cuda_build.py --shape qwen2.5-7b --tokenizer DIR --calibration data.jsonl \
        --methods svd,quant --ratio 0.5 --output reports/cuda-build-7b

No pretrained checkpoint is read: a checkpoint of the shape (benchmarks/cuda_memory.py's SHAPES) is
written with random values (transformers' initialisation, bf16, 4 GB safetensors shards) into
WORK/base (--work, default OUTPUT/work), with the tokenizer files of --tokenizer copied beside it (any tokenizer whose ids fit
the vocabulary). The calibration records are the records of --calibration packed end to end into
records of at least --max-length tokens, so the build calibrates on `--samples` full-length records
as the plan assumes. Each method's `emloc build` then runs in its own process, one after another;
measured: the process's wall time and the manifest's peak CUDA allocation (the build's own
`torch.cuda.max_memory_allocated`). The CUDA context and library workspaces outside torch's
allocator (~0.7 GiB, measured by benchmarks/cuda_memory.py) come on top of it; the plan's figure
includes them (`CUDA_OVERHEAD`). Figures are time and memory only, never quality: the
weights are random. Nothing is asserted; report.md / report.json go to --output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_memory import GIB, SHAPES, _config  # noqa: E402  (the shapes of the training measurements)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")


def shape_config(shape: str, tokenizer: Path):
    """The config of `shape`, its vocabulary widened to the tokenizer's where that is larger (the tiny dry run)."""
    from transformers import AutoTokenizer

    config = _config(shape)
    config.vocab_size = max(config.vocab_size, len(AutoTokenizer.from_pretrained(tokenizer)))
    return config


def write_base(config, folder: Path, tokenizer: Path, device: str) -> dict:
    """A checkpoint of `config` with random bf16 values in `folder`, with `tokenizer`'s files."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    made = time.time() - t0
    model.save_pretrained(folder, max_shard_size="4GB")
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"init_seconds": round(made, 1), "write_seconds": round(time.time() - t0 - made, 1), "checkpoint_bytes": size}


def pack_calibration(source: Path, tokenizer: Path, samples: int, max_length: int, out: Path) -> int:
    """Write `samples` records of >= `max_length` tokens made of `source`'s texts end to end; returns tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    texts = []
    for line in source.read_text().splitlines():
        rec = json.loads(line)
        texts.append(rec["text"] if "text" in rec else "\n".join(m["content"] for m in rec["messages"]))
    records, current, tokens, i = [], [], 0, 0
    while len(records) < samples:
        current.append(texts[i % len(texts)])
        i += 1
        n = len(tok("\n\n".join(current))["input_ids"])
        if n >= max_length:
            records.append({"text": "\n\n".join(current)})
            tokens += min(n, max_length)
            current = []
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return tokens


def predicted(config, samples: int, max_length: int, ratio: float, method: str) -> dict:
    """`emloc plan`'s build and inference estimates (bytes) for the same shape and calibration."""
    from emloc.plan import PlanConfig, predict

    plan = predict(config, PlanConfig(dtype="bf16", device="cuda", method=method, ratios=(1.0, ratio),
                                               calibration_samples=samples, calibration_len=max_length))
    return {"build": plan.build[ratio].total, "build_parts": plan.build[ratio].parts, "inference_1x2048": plan.inference.total}


def run_build(base: Path, data: Path, out: Path, method: str, ratio: float, samples: int, max_length: int,
              device: str) -> dict:
    """One `emloc build` in its own process; wall time and the manifest's figures."""
    cmd = [sys.executable, "-c", "from emloc.cli import main; main()", "build", "--base", str(base), "--calibration",
           str(data), "--output", str(out), "--method", method, "--ratio", str(ratio), "--samples", str(samples),
           "--max-length", str(max_length), "--device", device]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"method": method, "ratio": ratio, "wall_seconds": round(time.time() - t0, 1), "returncode": proc.returncode,
           "summary": (proc.stdout.strip().splitlines() or [""])[-1]}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip()[-1500:]
        return row
    manifest = json.loads((out / "manifest.json").read_text())
    row["memory"] = {k: manifest[k] for k in ("peak_rss_mb", "peak_cuda_allocated_mb") if k in manifest}
    row["emulator_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    row["build_seconds"], row["calibration"] = manifest["wall_seconds"], manifest["calibration"]
    return row


def report(rows: list[dict], base: dict, args: argparse.Namespace) -> str:
    lines = [f"# emloc build on a GPU, {args.shape}-shaped checkpoint (random values, bf16)\n",
             f"checkpoint {base['checkpoint_bytes'] / GIB:.2f} GiB (initialised in {base['init_seconds']} s, written in "
             f"{base['write_seconds']} s); calibration {args.samples} records x {args.max_length} tokens "
             f"({base['calibration_tokens']} tokens)\n",
             "| method | ratio | process wall (s) | build (s, manifest) | peak CUDA allocated (GiB) | plan's build (GiB, incl. runtime) | plan's inference 1 x 2048 (GiB) | emulator on disk (GiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r.get("predicted", {})
        peak = r.get("memory", {}).get("peak_cuda_allocated_mb")
        lines.append(f"| {r['method']} | {r['ratio']} | {r['wall_seconds']} | {r.get('build_seconds', '-')} | {f'{peak / 1024:.2f}' if peak else r.get('error', '-').splitlines()[-1][-200:]} | "
                     f"{p.get('build', 0) / GIB:.2f} | {p.get('inference_1x2048', 0) / GIB:.2f} | {r.get('emulator_bytes', 0) / GIB:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-7b", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json (and its config)")
    ap.add_argument("--calibration", type=Path, required=True, help="JSONL records (text or messages) to pack")
    ap.add_argument("--methods", default="svd,quant")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--device", default="cuda", help="where the checkpoint is initialised and the builds run (cpu: a dry run)")
    ap.add_argument("--output", type=Path, default=Path("reports/cuda-build"))
    ap.add_argument("--work", type=Path, help="where the checkpoint and emulators are written (default: OUTPUT/work)")
    args = ap.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    work = args.work or args.output / "work"
    base_dir, data = work / "base", work / "calibration.jsonl"
    config = shape_config(args.shape, args.tokenizer)
    base = write_base(config, base_dir, args.tokenizer, args.device)
    base["calibration_tokens"] = pack_calibration(args.calibration, args.tokenizer, args.samples, args.max_length, data)
    print(f"checkpoint written: {json.dumps(base)}", file=sys.stderr, flush=True)
    rows = []
    for method in args.methods.split(","):  # strictly one process at a time
        row = run_build(base_dir, data, work / f"emulator-{method}", method, args.ratio, args.samples, args.max_length,
                        args.device)
        row["predicted"] = predicted(config, args.samples, args.max_length, args.ratio, method)
        rows.append(row)
        print(f"built {method}: {json.dumps(row)}", file=sys.stderr, flush=True)
        shutil.rmtree(work / f"emulator-{method}", ignore_errors=True)  # disk: the next build needs the room
        (args.output / "report.json").write_text(json.dumps({"shape": args.shape, "base": base, "rows": rows}, indent=2) + "\n")
        (args.output / "report.md").write_text(report(rows, base, args))
    print(report(rows, base, args))


if __name__ == "__main__":
    main()
