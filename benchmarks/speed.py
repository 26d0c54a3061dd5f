"""Build and training speed beside their floors, each run in its own process.

    python benchmarks/speed.py --base smollm2-135m --ratios 0.5 0.25 --output /tmp/speed/smollm2 \
        [--reference 0.5=/path/to/emulator-built-by-an-earlier-version]

Build rows: `emloc build` at each ratio (wall time and peak RSS of the process), beside its floor:
one calibration forward of the original through the same engine (measured, in its own process),
plus the flops of the statistics and decompositions divided by this machine's measured float64
matrix-multiply rate (`decomposition_flops`; LAPACK runs below that rate, so the floor is a bound
no implementation reaches). With `--reference RATIO=DIR` the per-layer relative errors of an
emulator built by an earlier version (same data, settings and ratio) are compared with the new
ones, and its build time is shown as "before".

Training rows: `emloc train` on the original and on each emulator, same data, batch and seed; the
seconds of each optimizer step are read from loss_log.jsonl (the first step, which warms up, is
left out; median of the rest). The forward+backward flops of one step of each model are counted
with torch's FlopCounterMode on the first training batch, and the ratios emulator / original of
time and flops are compared.

Nothing is asserted: the script measures and writes report.md / report.json in --output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FORWARD = """
import json, sys, time, torch
from transformers import AutoTokenizer
from emloc.data import calibration_ids
from emloc.models import resolve_model, parse_dtype
from emloc.stream import StreamedModel
base, data, samples, max_length, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
folder = resolve_model(base)
ids = calibration_ids(data, AutoTokenizer.from_pretrained(folder), samples, max_length, seed)
dev = torch.device("cpu"); dt = parse_dtype(sys.argv[6], dev)
stream = StreamedModel(folder); stream.load_outside(dev, dt)
t = time.perf_counter()
for step in stream.passes(ids, dev, dt):
    step.run({})  # the block on every batch, no statistics
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": sum(len(i) for i in ids)}))
"""

FLOPS = """
import json, sys, torch
from peft import get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer
from emloc.data import collate, load_examples
from emloc.loss import answer_nll
from emloc.train import TrainConfig, load_model, lora_config
model, data, batch, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
net = load_model(model, "cpu", dtype)
tok = AutoTokenizer.from_pretrained(net.name_or_path)
b = collate(load_examples(data, tok, 512)[:batch], tok.pad_token_id if tok.pad_token_id is not None else 0)
torch.manual_seed(0)
peft_model = get_peft_model(net, lora_config(net, TrainConfig()))
with FlopCounterMode(display=False) as counter:
    nll, n = answer_nll(peft_model, b, 256)
    (nll / n).backward()
print(json.dumps({"flops": counter.get_total_flops()}))
"""


def run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run a process to completion; return its stdout (peak memory comes from the stage manifests)."""
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p.stdout


def gemm_rate(dtype: str, n: int = 2048) -> float:
    """Measured matrix-multiply rate of this machine in flop/s (best of 5)."""
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def decomposition_flops(layers: dict[str, dict], tokens: int) -> dict[str, float]:
    """Flops of `emloc build`'s statistics and decompositions, from an emulator manifest's layers.

    Counts (m x n layer, rank k, T calibration tokens): output side (m <= n): its outputs' Gram
    2 T m^2, C = W G W^T + lambda W W^T 2 m^2 n, eigh 4 m^3 (tridiagonalisation 4/3 m^3 and the
    eigenvectors' back-transformation 8/3 m^3; the tridiagonal solver counted free), U_k^T W 2 k m n.
    Input side (m > n): the input Gram 2 T n^2 and its eigh 4 n^3 once per block and width (layers
    reading one input share them), W S, (W S)^T (W S) and U = W S V 2 m n^2 each, their eigh 4 n^3,
    U_k^T W 2 k m n.
    """
    stats = decomp = 0.0
    shared: set[tuple[str, int]] = set()
    for name, layer in layers.items():
        k, m, n = layer["rank"], layer["out_features"], layer["in_features"]
        if k is None:
            continue
        if m <= n:
            stats += 2 * tokens * m * m
            decomp += 2 * m * m * n + 4 * m**3 + 2 * k * m * n
        else:
            key = (name.rsplit(".", 2)[0], n)  # the block (and its sub-module) reading one input
            if key not in shared:
                shared.add(key)
                stats += 2 * tokens * n * n
                decomp += 4 * n**3
            decomp += 6 * m * n * n + 4 * n**3 + 2 * k * m * n
    return {"statistics": stats, "decompositions": decomp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--data", default=None, help="JSONL (default: the chatterbot-topic training split)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="training steps per model (the first is left out)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32", help="compute dtype of build and training (float32, bfloat16)")
    ap.add_argument("--reference", nargs="*", default=[], metavar="RATIO=DIR",
                    help="emulator folders built by an earlier version, to compare time and relative errors")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-builds", action="store_true", help="reuse the emulators already in --output")
    ap.add_argument("--mmap-thresholds", type=int, nargs="+", default=[131072], metavar="BYTES",
                    help="EMLOC_MMAP_THRESHOLD values for the training rows (131072: the stage commands' default; "
                         "0: glibc's defaults)")
    ap.add_argument("--output", type=Path, default=Path("reports/speed"))
    args = ap.parse_args()
    from emloc.data import default_task

    data = args.data or str(default_task("chatterbot-topic")[0])
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    emloc = [sys.executable, "-m", "emloc.cli", "-q"]
    rates = {dt: gemm_rate(dt) for dt in ("float64", "float32")}
    report: dict = {"base": args.base, "data": data, "dtype": args.dtype, "samples": args.samples, "gemm_flops": rates,
                    "builds": {}, "training": {}}
    fwd = run([sys.executable, "-c", FORWARD, args.base, data, str(args.samples), "512", "0", args.dtype])
    report["forward"] = json.loads(fwd.strip().splitlines()[-1])
    refs = dict(r.split("=", 1) for r in args.reference)
    for ratio in args.ratios:
        emu = out / f"emulator-{ratio}"
        if not args.skip_builds:
            run(emloc + ["build", "--base", args.base, "--calibration", data, "--output", str(emu), "--method", "svd", "--ratio", str(ratio),
                         "--samples", str(args.samples), "--device", "cpu", "--dtype", args.dtype, "--overwrite"])
        m = json.loads((emu / "manifest.json").read_text())
        flops = decomposition_flops(m["layers"], m["calibration"]["tokens"])
        floor = report["forward"]["seconds"] + sum(flops.values()) / rates["float64"]
        row = {"seconds": m["wall_seconds"], "peak_rss_mb": m["peak_rss_mb"], "floor_seconds": floor, "flops": flops,
               "summed_rel_error": sum(v["rel_error"] for v in m["layers"].values())}
        ref = refs.get(str(ratio)) or refs.get(f"{ratio:g}")
        if ref:
            old = json.loads((Path(ref) / "manifest.json").read_text())
            diffs = [abs(old["layers"][k]["rel_error"] - v["rel_error"]) for k, v in m["layers"].items() if v["rank"]]
            row |= {"before_seconds": old["wall_seconds"], "before_peak_rss_mb": old["peak_rss_mb"],
                    "max_rel_error_diff": max(diffs), "before_summed_rel_error": sum(v["rel_error"] for v in old["layers"].values())}
        report["builds"][str(ratio)] = row
        print(json.dumps({ratio: row}), flush=True)
    if not args.skip_training:
        models = {"original": args.base} | {f"emulator {r}": str(out / f"emulator-{r}") for r in args.ratios}
        flops = {}
        for label, model in models.items():
            f = run([sys.executable, "-c", FLOPS, model, data, str(args.batch), args.dtype])
            flops[label] = json.loads(f.strip().splitlines()[-1])["flops"]
        for thr in args.mmap_thresholds:
            env = dict(os.environ, EMLOC_MMAP_THRESHOLD=str(thr))
            for label, model in models.items():
                folder = out / f"train-{label.replace(' ', '-')}-{thr}"
                run(emloc + ["train", "--model", model, "--data", data, "--output", str(folder), "--steps", str(args.steps),
                             "--batch-size", str(args.batch), "--micro-batch-size", str(args.batch), "--eval-every", "0",
                             "--eval-fraction", "0", "--device", "cpu", "--dtype", args.dtype, "--overwrite"], env)
                rows = [json.loads(x) for x in (folder / "loss_log.jsonl").read_text().splitlines()]
                man = json.loads((folder / "manifest.json").read_text())
                key = f"{label}, mmap threshold {thr}"
                report["training"][key] = {"s_per_step": statistics.median(r["seconds"] for r in rows[1:]),
                                           "first_step": rows[0]["seconds"], "peak_rss_mb": man["peak_rss_mb"],
                                           "flops": flops[label], "original": f"original, mmap threshold {thr}"}
                print(json.dumps({key: report["training"][key]}), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(format_report(report))
    print(format_report(report))


def format_report(r: dict) -> str:
    lines = [f"# Speed: {r['base']} ({r['dtype']}, {r['samples']} calibration records, "
             f"{r['forward']['tokens']} tokens)", "",
             f"Matrix-multiply rate of this machine: {r['gemm_flops']['float64'] / 1e9:.1f} GFLOP/s float64, "
             f"{r['gemm_flops']['float32'] / 1e9:.1f} GFLOP/s float32. One calibration forward of the original: "
             f"{r['forward']['seconds']:.1f} s.", "",
             "| ratio | build before (s) | build now (s) | floor (s) | now / floor | max abs. diff of rel. errors | peak RSS now (MB) |",
             "|---|---|---|---|---|---|---|"]
    for ratio, b in r["builds"].items():
        before = f"{b['before_seconds']:.1f}" if "before_seconds" in b else "-"
        diff = f"{b['max_rel_error_diff']:.1e}" if "max_rel_error_diff" in b else "-"
        lines.append(f"| {ratio} | {before} | {b['seconds']:.1f} | {b['floor_seconds']:.1f} | "
                     f"{b['seconds'] / b['floor_seconds']:.2f} | {diff} | {b['peak_rss_mb']:.0f} |")
    if r["training"]:
        lines += ["", "| training | s/step | flops/step (G) | time / original | flops / original | peak RSS (MB) |",
                  "|---|---|---|---|---|---|"]
        for label, t in r["training"].items():
            orig = r["training"].get(t.get("original", "original"))
            tr = f"{t['s_per_step'] / orig['s_per_step']:.2f}" if orig else "-"
            fr = f"{t['flops'] / orig['flops']:.2f}" if orig else "-"
            lines.append(f"| {label} | {t['s_per_step']:.2f} | {t['flops'] / 1e9:.0f} | {tr} | {fr} | {t['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
