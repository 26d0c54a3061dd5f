"""Forward + backward time of one frozen layer: dense, `QuantLinear` in each format and row blocking,
and `LowRankLinear` at given ranks.

    python benchmarks/layer_speed.py --device cuda --shape 27648x5120 --tokens 2048 [--profile] [--ranks 1507 1504] [--formats nf4]

The input needs its gradient and the layer is frozen, as in LoRA training: the backward is the input
gradient only (`QuantLinear.transposed_map`, which rebuilds the weight again). Random codes and
scales (speed only). Each variant: median of 10 timed forward+backward calls after 3 warm-ups,
synchronised. `--row-block-entries` values set `emloc.quant.ROW_BLOCK_ENTRIES` on every device
(entries of one rebuilt slice of the weight) for the quantised variants. Prints a markdown table; nothing asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _time(fn, device: str, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    import emloc.quant as q

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="27648x5120", help="out x in")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--row-block-entries", type=int, nargs="+", default=[q.ROW_BLOCK_ENTRIES["cpu"], q.ROW_BLOCK_ENTRIES["cuda"]])
    ap.add_argument("--ranks", type=int, nargs="*", default=[], help="LowRankLinear ranks to time")
    ap.add_argument("--formats", nargs="*", default=["int8", "nf4"], help="QuantLinear formats to time")
    ap.add_argument("--profile", action="store_true", help="torch.profiler's top operators for each quantised variant")
    args = ap.parse_args()
    m, n = (int(v) for v in args.shape.split("x"))
    dev, dt = args.device, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.tokens, n, dtype=dt, device=dev, generator=g).requires_grad_()
    grad = torch.randn(args.tokens, m, dtype=dt, device=dev, generator=g)
    dense = torch.nn.Linear(n, m, bias=False, device=dev, dtype=dt).requires_grad_(False)

    def step(layer):
        def run():
            x.grad = None
            layer(x).backward(grad)
        return run

    rows = ["| layer | row block entries | ms per forward+backward | vs dense |", "|---|---:|---:|---:|"]
    base = _time(step(dense), dev)
    rows.append(f"| dense bf16 {m}x{n} | - | {base * 1e3:.2f} | 1.00 |")
    from emloc.lowrank import LowRankLinear

    for k in args.ranks:
        layer = LowRankLinear(n, m, k, bias=False, device=dev, dtype=dt).requires_grad_(False)
        with torch.no_grad():
            layer.up.normal_(0, 0.02, generator=g)
            layer.down.normal_(0, 0.02, generator=g)
        t = _time(step(layer), dev)
        rows.append(f"| low-rank k={k} {m}x{n} ({k * (m + n) / (m * n):.3f} of the flops) | - | {t * 1e3:.2f} | {t / base:.2f} |")
    default = dict(q.ROW_BLOCK_ENTRIES)
    for fmt in args.formats:
        layer = q.QuantLinear(n, m, fmt, 0, bias=False, device=dev, dtype=dt)
        with torch.no_grad():
            layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, dtype=torch.uint8, device=dev, generator=g))
            layer.scales.uniform_(0.01, 0.03)
        for entries in args.row_block_entries:
            q.ROW_BLOCK_ENTRIES.update(dict.fromkeys(default, entries))
            t = _time(step(layer), dev)
            rows.append(f"| {fmt} {m}x{n} | {entries} | {t * 1e3:.2f} | {t / base:.2f} |")
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
                with profile(activities=acts) as prof:
                    step(layer)()
                    if dev == "cuda":
                        torch.cuda.synchronize()
                key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
                print(f"## {fmt}, {entries} entries\n{prof.key_averages().table(sort_by=key, row_limit=12)}")
        q.ROW_BLOCK_ENTRIES.update(default)
    print(f"# {args.tokens} tokens, bf16, {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'})")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
