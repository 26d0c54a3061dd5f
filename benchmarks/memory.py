"""Peak memory of every stage, each in its own process, beside the original model's inference.

    python benchmarks/memory.py --base smollm2-135m --ratios 0.5 0.25 --batch 8 --seq-len 256 --output reports/memory-smollm2

Rows: inference of the original (one forward at batch x seq-len with logits at every position, as
`model(input_ids)` returns them, and with last-position logits only, as `generate` prefills); LoRA training on the original; and for each ratio the EMLoC stages build, train (on the
emulator), correct and merge. Training rows use the same batch and sequence length, plain text
records of exactly seq-len tokens (loss on every token, the worst case for the loss). Peak RSS is
read by the OS for each process (`/usr/bin/time`-style ru_maxrss of the child); on a GPU the
training manifests also carry torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

INFER = """
import sys, torch
from emloc.cli import _return_freed_memory
_return_freed_memory()  # the same allocator setting as the emloc commands it is compared with
from transformers import AutoModelForCausalLM
from emloc.models import resolve_model, parse_device, parse_dtype
dev = parse_device(sys.argv[3]); model = AutoModelForCausalLM.from_pretrained(resolve_model(sys.argv[4]), dtype=parse_dtype(sys.argv[5], dev)).to(dev).eval()
ids = torch.randint(0, model.config.vocab_size, (int(sys.argv[1]), int(sys.argv[2])), device=dev)
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default: the whole batch in one pass")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--output", default="reports/memory")
    args = ap.parse_args()

    from emloc.models import resolve_model
    from transformers import AutoTokenizer

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    base = resolve_model(args.base)
    tok = AutoTokenizer.from_pretrained(base)
    rng = random.Random(0)
    vocab = [t for t in tok.get_vocab() if t.isalpha() and len(t) > 3][:5000]
    data = out / "text.jsonl"
    with data.open("w") as f:
        for _ in range(max(args.samples, args.batch * args.steps)):
            words = []
            while len(tok(" ".join(words))["input_ids"]) < args.seq_len:
                words += [rng.choice(vocab) for _ in range(32)]
            ids = tok(" ".join(words))["input_ids"][: args.seq_len]
            f.write(json.dumps({"text": tok.decode(ids)}) + "\n")
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
    add("inference (original)", None, infer + ["0"])
    # generate() computes logits for the last position only during prefill: the leaner reference
    add("inference, last-token logits", None, infer + ["1"])
    add("LoRA train (original)", None, emloc + ["train", "--model", str(base), "--data", str(data), "--output", str(work / "lora"), *train_flags])
    for r in args.ratios:
        emu, ad, cor, mer = (work / f"{n}-{r}" for n in ("emulator", "adapter", "corrected", "merged"))
        add("EMLoC build", r, emloc + ["build", "--base", str(base), "--data", str(data), "--output", str(emu), "--ratio", str(r),
                                       "--samples", str(args.samples), "--max-length", str(args.seq_len + 8), "--overwrite", *dev])
        add("EMLoC train (emulator)", r, emloc + ["train", "--model", str(emu), "--data", str(data), "--output", str(ad), *train_flags])
        add("EMLoC correct", r, emloc + ["correct", "--adapter", str(ad), "--output", str(cor), "--overwrite"])
        add("EMLoC merge", r, emloc + ["merge", "--adapter", str(cor), "--output", str(mer), "--overwrite"])
    infer = rows[0]["peak_rss_mb"]
    for row in rows:
        row["vs_inference"] = round(row["peak_rss_mb"] / infer, 3)
    report = {"base": str(base), "batch": args.batch, "seq_len": args.seq_len, "gradient_checkpointing": args.gradient_checkpointing,
              "micro_batch_size": int(micro), "device": args.device, "command": " ".join(sys.argv), "rows": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = [f"`{report['command']}`", "", f"{Path(str(base)).name}, batch {args.batch} x {args.seq_len} tokens, "
             f"micro-batch {micro}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.device}", "",
             "| stage | ratio | peak RSS (MB) | vs inference | wall (s) |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['stage']} | {row['ratio'] if row['ratio'] is not None else '-'} | {row['peak_rss_mb']:.0f} | "
                     f"{row['vs_inference']:.2f} | {row['wall_seconds']:.0f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
