"""GPU memory and step time of a large config-built model, beside `emloc.plan.predict` (device cuda).

    python benchmarks/cuda_memory.py --shape qwen2.5-32b --output reports/cuda-32b [--only lora,svd_0.25]

No checkpoint is read: the model is built from its config directly on the GPU with random values,
in the layer types emloc's emulators hold (`LowRankLinear` for svd, `QuantLinear` with random codes
for quant), so the figures are memory and speed only, never quality. Each scenario runs in its own
process (a fresh CUDA context), one after another:

    inference        one no-grad forward of the original at B x T with the KV cache on and logits at
                     every position (as `model(input_ids)`), then, in the same process after a reset
                     of the peak, with the last position's logits only (as `generate` prefills).
    lora             LoRA on the original as `emloc train` sets it up (`emloc.train._peft`: rank 8 on
                     every block linear, non-reentrant gradient checkpointing), emloc's chunked answer
                     loss (`emloc.loss.answer_nll`, 256-token head chunks, loss on every token), AdamW.
    svd_R, quant_R   the same on an emulator at ratio R (`emloc build --method svd|quant`).

Measured per scenario: `torch.cuda.max_memory_allocated` (reset after the model is built, so it is
the peak of the stage with its weights), `max_memory_reserved`, the memory outside torch's allocator
(device memory in use minus reserved: the CUDA context, kernels and library workspaces, which
`predict` counts as CUDA_OVERHEAD), and the seconds of each optimizer step (synchronised; the first
step warms up and is left out of the median). `predict` is evaluated for the same shape and
settings and written beside them in report.md / report.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
# Qwen2.5 shapes (their published configs; the 32B is the paper's 38B-class situation)
SHAPES = {
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),  # a dry run on CPU
}
DEFAULT_SCENARIOS = ("inference", "lora", "svd_0.5", "svd_0.25", "quant_0.5", "quant_0.25")


def _config(shape: str):
    from transformers import Qwen2Config

    return Qwen2Config(max_position_embeddings=32768, **SHAPES[shape])


def _model(shape: str, scenario: str, device: str):
    """The model of `scenario` on `device` in bfloat16 with random values (emulator layers as emloc builds them)."""
    import torch
    from accelerate.utils import set_module_tensor_to_device

    from emloc.emulator import _set_module
    from emloc.lowrank import LowRankLinear
    from emloc.models import block_linears, empty_model, find_blocks
    from emloc.quant import QuantLinear
    from emloc.ratios import layer_plan

    model = empty_model(_config(shape))
    if "_" in scenario:
        method, ratio = scenario.split("_")[0], float(scenario.split("_")[1])
        name, blocks = find_blocks(model)
        for i, block in enumerate(blocks):
            for rel, lin in list(block_linears(block)):
                p = layer_plan(lin.out_features, lin.in_features, ratio, method)
                if p["kind"] == "lowrank":
                    new = LowRankLinear(lin.in_features, lin.out_features, p["rank"], lin.bias is not None, device="meta")
                elif p["kind"] == "quant":
                    new = QuantLinear(lin.in_features, lin.out_features, p["format"], p["rank"], lin.bias is not None, device="meta")
                else:
                    continue
                _set_module(model, f"{name}.{i}.{rel}", new)
    g = torch.Generator(device=device).manual_seed(0)
    for pname, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.dtype == torch.uint8:  # quantised codes: any bytes
            value = torch.randint(0, 256, t.shape, dtype=torch.uint8, device=device, generator=g)
        elif t.device.type != "meta":  # buffers made for real (rotary frequencies)
            value = t.to(device)
        elif pname.endswith("norm.weight"):
            value = torch.ones(t.shape, dtype=torch.bfloat16, device=device)
        else:
            dtype = torch.float16 if pname.endswith("scales") else torch.bfloat16
            value = torch.empty(t.shape, dtype=dtype, device=device).normal_(0, 0.02, generator=g)
        set_module_tensor_to_device(model, pname, device, value=value, dtype=value.dtype)
    return model.eval()


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peaks(device: str) -> dict:
    import torch

    if device != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
            "outside_torch": (total - free) - torch.cuda.memory_reserved()}


def _reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def child(shape: str, scenario: str, device: str, batch: int, seq_len: int, steps: int) -> dict:
    """Run one scenario in this process; returns its measurements."""
    import torch

    import emloc
    from emloc.loss import answer_nll

    out: dict = {"scenario": scenario, "torch": torch.__version__, "emloc": emloc.__version__}
    t0 = time.time()
    model = _model(shape, scenario, device)
    _sync(device)
    out["build_seconds"] = round(time.time() - t0, 1)
    out["weight_bytes"] = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq_len), generator=g).to(device)
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    _reset(device)
    if scenario == "inference":
        with torch.no_grad():
            model(input_ids=ids, attention_mask=batch_["attention_mask"], use_cache=True)
            out["full_logits"] = _peaks(device)
            _reset(device)
            model(input_ids=ids, attention_mask=batch_["attention_mask"], use_cache=True, logits_to_keep=1)
            out["last_logits"] = _peaks(device)
        return out
    from emloc.train import TrainConfig, _peft

    net = _peft(model, TrainConfig(gradient_checkpointing=True), sharded=False)
    trainable = [p for p in net.parameters() if p.requires_grad]
    out["lora_params"] = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    net.train()
    seconds = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        nll, n = answer_nll(net, batch_, chunk=256)
        (nll / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        seconds.append(time.perf_counter() - t)
    out["loss"] = float(nll.detach() / n)
    out["step_seconds"] = [round(s, 4) for s in seconds]
    out["median_step_seconds"] = round(statistics.median(seconds[1:] or seconds), 4)
    out["train"] = _peaks(device)
    return out


def predicted(shape: str, batch: int, seq_len: int) -> dict:
    """`predict`'s totals (bytes) for every scenario."""
    from emloc.plan import PlanConfig, predict

    config = _config(shape)
    out = {}
    for method in ("svd", "quant"):
        plan = predict(config, PlanConfig(batch=batch, seq_len=seq_len, dtype="bf16", device="cuda", method=method,
                                          ratios=(1.0, 0.5, 0.25)))
        out["inference"], out["lora"] = plan.inference.total, plan.lora_training.total
        for r in (0.5, 0.25):
            out[f"{method}_{r}"] = plan.training_at(r).total
        out["runtime"] = plan.overhead
    return out


def report(results: list[dict], pred: dict, args: argparse.Namespace) -> str:
    rows = [f"# GPU memory, {args.shape}-shaped (random values), batch {args.batch} x {args.seq_len}, bf16\n",
            "| scenario | predicted total | measured max allocated | outside torch | allocated + outside | "
            "predicted / measured | max reserved | s/step (median) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        stages = [("inference, full logits", r.get("full_logits")), ("inference, last logits", r.get("last_logits"))] \
            if r["scenario"] == "inference" else [(r["scenario"], r.get("train"))]
        for label, m in stages:
            p = pred.get("inference" if r["scenario"] == "inference" else r["scenario"])
            p = p if label != "inference, last logits" else None
            if not m:  # a failed scenario, or a run on cpu (no GPU figures)
                rows.append(f"| {label} | {f'{p / GIB:.2f}' if p else '-'} | {r.get('error', 'not on a GPU')[:120]} | | | | | "
                            f"{r.get('median_step_seconds', '-')} |")
                continue
            meas = m["max_allocated"] + m["outside_torch"]
            ratio = f"{p / meas:.3f}" if p else "-"
            ps = f"{p / GIB:.2f}" if p else "-"
            rows.append(f"| {label} | {ps} | {m['max_allocated'] / GIB:.2f} | {m['outside_torch'] / GIB:.2f} | "
                        f"{meas / GIB:.2f} | {ratio} | {m['max_reserved'] / GIB:.2f} | {r.get('median_step_seconds', '-')} |")
    rows.append(f"\nGiB = 2^30 bytes. predict's runtime term on cuda: {pred['runtime'] / GIB:.2f} GiB.")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-32b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", help="comma-separated scenarios (default: %s)" % ",".join(DEFAULT_SCENARIOS))
    ap.add_argument("--output", type=Path, default=Path("reports/cuda-memory"))
    ap.add_argument("--row-block-entries", type=int, help="set emloc.quant.ROW_BLOCK_ENTRIES on every device (entries of one rebuilt "
                    "slice of a quantised weight) in every scenario")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        if args.row_block_entries:
            import emloc.quant

            emloc.quant.ROW_BLOCK_ENTRIES.update(dict.fromkeys(emloc.quant.ROW_BLOCK_ENTRIES, args.row_block_entries))
        print(json.dumps(child(args.shape, args.child, args.device, args.batch, args.seq_len, args.steps)))
        return
    args.output.mkdir(parents=True, exist_ok=True)
    pred = predicted(args.shape, args.batch, args.seq_len)
    results = []
    for s in (args.only.split(",") if args.only else DEFAULT_SCENARIOS):  # strictly one process at a time
        cmd = [sys.executable, __file__, "--child", s, "--shape", args.shape, "--device", args.device,
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
        cmd += ["--row-block-entries", str(args.row_block_entries)] if args.row_block_entries else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({"scenario": s, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"})
            print(f"{s} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        else:
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"measured {s}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
        (args.output / "report.json").write_text(json.dumps({"shape": args.shape, "batch": args.batch, "seq_len": args.seq_len,
                                                             "predicted": pred, "results": results}, indent=2) + "\n")
        (args.output / "report.md").write_text(report(results, pred, args))
    print(report(results, pred, args))


if __name__ == "__main__":
    main()
