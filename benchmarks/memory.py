"""Peak memory of every stage, each in its own process, beside the original model's inference.

    python benchmarks/memory.py --base smollm2-135m --ratios 0.5 0.25 --batch 8 --seq-len 256 --output reports/memory-smollm2

Rows: inference of the original (one forward at batch x seq-len with logits at every position, as
`model(input_ids)` returns them, and with last-position logits only, as `generate` prefills); LoRA training on the original; and for each ratio the EMLoC stages build, train (on the
emulator), correct and merge. Training rows use the same batch and sequence length, plain text
records of exactly seq-len tokens (loss on every token, the worst case for the loss). Peak RSS is
read by the OS for each process (`/usr/bin/time`-style ru_maxrss of the child, which Linux starts
at the parent's peak: the report records that floor as `parent_peak_rss_mb`); on a GPU the
training manifests also carry torch.cuda.max_memory_allocated. The inference rows run on the first
batch records of the same data (token ids written by the parent, so no tokenizer is loaded there).

Each run also prints, and writes to report.md, `emloc.plan.predict` beside the measurements, with
the distinct token ids of the data as `vocab_used` (it matters on CPU for an untied input
embedding, whose rows that are never looked up stay unread in the memory map). To compare an
earlier report with the current `predict` without measuring again:

    python benchmarks/memory.py --compare reports/memory-qwen/report.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

INFER = """
import sys, torch
from emloc.artifacts import return_freed_memory
return_freed_memory()  # EMLOC_MMAP_THRESHOLD, set by the parent for every child
from transformers import AutoModelForCausalLM
from emloc.models import resolve_model, parse_device, parse_dtype
dev = parse_device(sys.argv[3]); model = AutoModelForCausalLM.from_pretrained(resolve_model(sys.argv[4]), dtype=parse_dtype(sys.argv[5], dev)).to(dev).eval()
import json
ids = torch.tensor(json.load(open(sys.argv[7])), device=dev)  # batch x seq_len ids of the data
with torch.no_grad():
    logits = model(input_ids=ids, logits_to_keep=int(sys.argv[6])).logits  # 0: all positions
print(float(logits[0, 0, 0]))
"""


def run(cmd: list[str]) -> tuple[float, float]:
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read() if p.stderr else ""
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}\n{err[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def main() -> None:
    # peaks of memory in use: every child (stage commands, inference) returns freed memory to the OS
    os.environ.setdefault("EMLOC_MMAP_THRESHOLD", "131072")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--methods", nargs="*", default=["svd"], help="emulator methods (svd, quant, svd+quant); "
                    "correct and merge run for svd only; none given: the original's rows only")
    ap.add_argument("--qlora", action="store_true", help="add LoRA training on an NF4 copy of the original (bitsandbytes)")
    ap.add_argument("--vocab-format", default="keep", help="the emulators' embedding and head: keep, int8 or nf4 "
                    "(emloc build --vocab-format)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default: the whole batch in one pass")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--stats-dtype", default="float64", choices=["float64", "float32"], help="Gram/SVD dtype of the builds")
    ap.add_argument("--no-original", action="store_true", help="skip the inference and LoRA-on-the-original rows")
    ap.add_argument("--reuse-emulators", action="store_true",
                    help="do not rebuild work/emulator-RATIO where it exists (its build row is then left out)")
    ap.add_argument("--output", default="reports/memory")
    ap.add_argument("--compare", type=Path, metavar="REPORT_JSON",
                    help="only print an earlier report.json beside the current `emloc plan` prediction")
    args = ap.parse_args()
    if args.compare:
        print(compare(json.loads(args.compare.read_text()), args.compare.parent))
        return

    from emloc.artifacts import peak_rss_mb
    from emloc.models import resolve_model
    from transformers import AutoTokenizer

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    # a packaged model is converted on first use, in a process of its own: a child's ru_maxrss starts
    # at its parent's peak (Linux keeps it over fork and exec), so the parent must stay small
    subprocess.run([sys.executable, "-c", f"from emloc.models import resolve_model; resolve_model({args.base!r})"], check=True)
    base = resolve_model(args.base)
    tok = AutoTokenizer.from_pretrained(base)
    data = write_text_records(out / "text.jsonl", tok, max(args.samples, args.batch * args.steps), args.seq_len)
    vocab_used, infer_ids = data_ids(data, tok, args.batch, args.seq_len)
    infer_vocab_used = len({i for row in infer_ids for i in row})  # the inference rows read only these
    ids_file = out / "infer_ids.json"
    ids_file.write_text(json.dumps(infer_ids))
    py = sys.executable
    emloc = [py, "-m", "emloc.cli", "-q"]
    dev = ["--device", args.device, "--dtype", args.dtype]
    micro = str(args.micro_batch_size or args.batch)
    train_flags = ["--steps", str(args.steps), "--batch-size", str(args.batch), "--micro-batch-size", micro,
                   "--max-length", str(args.seq_len + 8), "--eval-fraction", "0", "--overwrite",
                   "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing", *dev]
    rows = []

    def add(stage: str, ratio: float | None, cmd: list[str]) -> None:
        rss, wall = run(cmd)
        rows.append({"stage": stage, "ratio": ratio, "peak_rss_mb": round(rss, 1), "wall_seconds": round(wall, 1)})
        print(f"{stage:<28} {'' if ratio is None else ratio:<6} {rss:9.1f} MB {wall:7.1f} s", flush=True)

    infer = [py, "-c", INFER, str(args.batch), str(args.seq_len), args.device, str(base), args.dtype]
    if not args.no_original:
        add("inference (original)", None, infer + ["0", str(ids_file)])
        # generate() computes logits for the last position only during prefill: the leaner reference
        add("inference, last-token logits", None, infer + ["1", str(ids_file)])
        add("LoRA train (original)", None, emloc + ["train", "--model", str(base), "--data", str(data), "--output", str(work / "lora"), *train_flags])
    if args.qlora:
        add("QLoRA train (NF4 original)", None, emloc + ["train", "--model", str(base), "--data", str(data), "--output",
                                                          str(work / "qlora"), "--quantize", "nf4", *train_flags])
    for stage, r, cmd in emulator_stages(args, str(base), data, work, emloc, dev, train_flags):
        add(stage, r, cmd)
    infer = rows[0]["peak_rss_mb"] if rows and rows[0]["stage"].startswith("inference") else None
    for row in rows:
        row["vs_inference"] = round(row["peak_rss_mb"] / infer, 3) if infer else None
    report = {"base": str(base), "batch": args.batch, "seq_len": args.seq_len, "gradient_checkpointing": args.gradient_checkpointing,
              "micro_batch_size": int(micro), "device": args.device, "dtype": args.dtype, "samples": args.samples,
              "stats_dtype": args.stats_dtype, "vocab_used": vocab_used, "vocab_format": args.vocab_format,
              "infer_vocab_used": infer_vocab_used, "command": " ".join(sys.argv), "rows": rows,
              "parent_peak_rss_mb": peak_rss_mb()}  # every row's floor (see the module docstring)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (out / "report.md").write_text(text + "\n")
    print(text)


def emulator_stages(args: argparse.Namespace, base: str, data: Path, work: Path, emloc: list[str], dev: list[str],
                    train_flags: list[str]) -> list[tuple[str, float, list[str]]]:
    """(stage, ratio, command) of each emulator's build (unless reused), training and, for svd, correct and merge."""
    from emloc.bench import reachable

    stages = []
    for method in args.methods:
        tag = "" if method == "svd" else f" [{method}]"
        for r in args.ratios:
            if not reachable(base, method, r):
                continue
            emu, ad, cor, mer = (work / f"{n}-{r}{tag.strip(' []')}" for n in ("emulator", "adapter", "corrected", "merged"))
            if not (args.reuse_emulators and (emu / "manifest.json").is_file()):
                stages.append(("EMLoC build" + tag, r, emloc + [
                    "build", "--base", base, "--calibration", str(data), "--output", str(emu), "--method", method, "--ratio", str(r),
                    "--samples", str(args.samples), "--max-length", str(args.seq_len + 8), "--overwrite",
                    "--stats-dtype", args.stats_dtype, "--vocab-format", args.vocab_format, *dev]))
            stages.append(("EMLoC train (emulator)" + tag, r, emloc + ["train", "--model", str(emu), "--data", str(data),
                                                                        "--output", str(ad), *train_flags]))
            if method == "svd":
                stages.append(("EMLoC correct", r, emloc + ["correct", "--adapter", str(ad), "--output", str(cor), "--overwrite"]))
                stages.append(("EMLoC merge", r, emloc + ["merge", "--adapter", str(cor), "--output", str(mer), "--overwrite"]))
    return stages


def write_text_records(path: Path, tok, n: int, seq_len: int) -> Path:
    """`n` plain-text records of exactly `seq_len` tokens of random words (loss on every token)."""
    rng = random.Random(0)
    vocab = [t for t in tok.get_vocab() if t.isalpha() and len(t) > 3][:5000]
    with path.open("w") as f:
        for _ in range(n):
            words: list[str] = []
            while len(tok(" ".join(words))["input_ids"]) < seq_len:
                words += [rng.choice(vocab) for _ in range(32)]
            ids = tok(" ".join(words))["input_ids"][:seq_len]
            f.write(json.dumps({"text": tok.decode(ids)}) + "\n")
    return path


def markdown(report: dict) -> str:
    """The report's rows as a table, then `emloc plan`'s predictions beside them."""
    lines = [f"`{report['command']}`", "", f"{Path(report['base']).name}, batch {report['batch']} x {report['seq_len']} tokens, "
             f"micro-batch {report['micro_batch_size']}, gradient checkpointing {'on' if report['gradient_checkpointing'] else 'off'}, "
             f"{report['device']}", "", "| stage | ratio | peak RSS (MB) | vs inference | wall (s) |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['stage']} | {row['ratio'] if row['ratio'] is not None else '-'} | {row['peak_rss_mb']:.0f} | "
                     f"{row['vs_inference'] or float('nan'):.2f} | {row['wall_seconds']:.0f} |")
    return "\n".join(lines + ["", compare(report)])


def data_ids(data: Path, tok, batch: int, seq_len: int) -> tuple[int, list[list[int]]]:
    """Distinct token ids of the records as emloc tokenises them (with the pad/eos ids), and the first
    `batch` records' ids cut or padded to `seq_len` (the inference rows' input)."""
    from emloc.data import load_examples

    examples = load_examples(data, tok, seq_len + 8)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    used = {i for e in examples for i in e.input_ids} | {i for i in (pad, tok.eos_token_id) if i is not None}
    first = [(e.input_ids[:seq_len] + [pad] * seq_len)[:seq_len] for e in examples[:batch]]
    return len(used), first


PREDICTED = {"inference (original)": "inference", "LoRA train (original)": "lora", "EMLoC build": "build",
             "EMLoC train (emulator)": "train", "EMLoC correct": "correct", "EMLoC merge": "merge"}


def compare(report: dict, folder: Path | None = None) -> str:
    """A markdown table: each measured row beside `emloc.plan.predict` for the report's settings (MiB).

    `folder` (the report's) supplies infer_ids.json when the report does not count its distinct ids.
    """
    from emloc.plan import PlanConfig, predict

    if "infer_vocab_used" not in report and folder is not None and (folder / "infer_ids.json").is_file():
        report["infer_vocab_used"] = len({i for row in json.loads((folder / "infer_ids.json").read_text()) for i in row})

    ratios = sorted({r["ratio"] for r in report["rows"] if r["ratio"] is not None})
    dtype = report.get("dtype", "auto")
    if dtype == "auto":
        dtype = "fp32" if report["device"] == "cpu" else "bf16"
    cfg = PlanConfig(method="svd", batch=report["batch"], seq_len=report["seq_len"], rank=8, dtype=dtype, device=report["device"],
                     ratios=(1.0, *ratios), gradient_checkpointing=report["gradient_checkpointing"],
                     calibration_samples=report.get("samples", 64), calibration_len=report["seq_len"],
                     stats_dtype=report.get("stats_dtype", "float64"), vocab_used=report.get("vocab_used"),
                     vocab_format=report.get("vocab_format", "keep"))
    plan = predict(report["base"], cfg)
    if report.get("infer_vocab_used"):  # the inference rows read the first batch records only
        plan.inference = predict(plan.shape, replace(cfg, vocab_used=report["infer_vocab_used"])).inference

    def estimate(stage: str, ratio: float | None):
        if stage.startswith("EMLoC train (emulator) ["):  # a quantised emulator: the plan for its method
            return predict(plan.shape, replace(cfg, method=stage.split("[")[1].rstrip("]"), ratios=(1.0, ratio))).training[ratio]
        kind = PREDICTED.get(stage)
        return {"inference": lambda: plan.inference, "lora": lambda: plan.lora_training,
                "build": lambda: plan.build[ratio], "train": lambda: plan.training[ratio],
                "correct": lambda: plan.correct, "merge": lambda: plan.merge}[kind]() if kind else None

    lines = [f"`emloc plan` for these settings (vocab_used {cfg.vocab_used}, {report.get('infer_vocab_used')} for the "
             f"inference rows; stats {cfg.stats_dtype}; MB = 2^20 bytes):", "",
             "| stage | ratio | predicted (MB) | measured (MB) | error |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        e = estimate(row["stage"], row["ratio"])
        if e is None:
            continue
        pred, meas = e.total / 2**20, row["peak_rss_mb"]
        lines.append(f"| {row['stage']} | {row['ratio'] if row['ratio'] is not None else '-'} | {pred:.0f} | {meas:.0f} "
                     f"| {100 * (pred - meas) / meas:+.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
