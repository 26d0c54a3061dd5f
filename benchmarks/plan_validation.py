"""Check `emloc.plan.predict` against measured peak memory on CPU (SmolLM2-135M, fp32).

Each scenario runs in its own Python process, one after another (never in parallel), with one
torch thread; the child reports its own peak RSS (`emloc.artifacts.peak_rss_mb`, VmHWM) and the parent compares it with
`predict(..., PlanConfig(device="cpu", dtype="fp32", batch=8, seq_len=128, rank=8))`.

Scenarios:
    imports    `import torch, transformers, peft, emloc` and nothing else (the runtime overhead).
    inference  one no-grad forward at batch 8 x 128 tokens (KV cache on, as in generation).
    lora       LoRA r=8 on all 7 projections, AdamW, 2 steps, no gradient checkpointing.
    lora_ckpt  the same with gradient checkpointing (non-reentrant, as emloc.train does).
    emloc_0.5  the same as `lora` on an emulator-shaped model at ratio 0.5 (random factors: memory only).
    lora_chunked  `lora` with emloc's own loss (emloc.loss.answer_nll, 128-token head chunks) instead
               of `labels=` (full B x T x V logits), as `emloc train` computes it.
    factorize_wide / factorize_tall  `emloc.lowrank.factorize` of one random float64 layer (768 x 3072
               and 3072 x 768) with a random Gram: the SVD workspace that dominates `emloc build`.

Every scenario but `imports` also runs as `<name>+mmap`, with MALLOC_MMAP_THRESHOLD_=131072: glibc
then returns every freed tensor to the OS, so the peak RSS is the peak of live tensors, which is what
`predict` models; the default glibc keeps freed heap blocks, which `predict` adds on cpu as
CPU_ALLOCATOR_SLACK x one forward's block activations (calibrated on these measurements).

The batch mimics emloc's collate: half the rows are right-padded by 32 tokens (mask 0, label -100),
so attention runs with a padding mask as in real training.

Usage:
    python benchmarks/plan_validation.py [--model DIR] [--json OUT.json] [--only lora,lora+mmap]
    python benchmarks/plan_validation.py --from-json OUT.json   # compare earlier measurements again
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = Path("~/.cache/emloc/models/smollm2-135m").expanduser()
SCENARIOS = ("imports", "inference", "lora", "lora_ckpt", "emloc_0.5", "lora_chunked")
LOSS_CHUNK = 128  # lora_chunked: emloc.loss.answer_nll with this chunk
# one layer's whitened SVD in float64 (emloc build's dominant term): (m out, n in)
FACTORIZE = {"factorize_wide": (768, 3072), "factorize_tall": (3072, 768)}
MMAP_SUFFIX = "+mmap"  # same scenario with MALLOC_MMAP_THRESHOLD_=131072 (no glibc heap retention)
BATCH, SEQ, RANK = 8, 128, 8
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _batch(vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[BATCH // 2:, SEQ - 32:] = 0
    ids = ids.masked_fill(mask == 0, 2)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _emulator_model(folder: Path, ratio: float):
    """An emulator-shaped model (LowRankLinear at `ratio`, as build_emulator would make it), random values."""
    import torch
    from accelerate.utils import set_module_tensor_to_device

    from emloc.emulator import _set_module
    from emloc.lowrank import LowRankLinear, rank_for_ratio, saves_parameters
    from emloc.models import block_linears, empty_model, find_blocks, load_config

    model = empty_model(load_config(folder))
    name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for rel, lin in list(block_linears(block)):
            m, n = lin.out_features, lin.in_features
            k = rank_for_ratio(m, n, ratio)
            if saves_parameters(m, n, k):
                _set_module(model, f"{name}.{i}.{rel}", LowRankLinear(n, m, k, lin.bias is not None, device="meta"))
    torch.manual_seed(0)
    for pname, p in list(model.named_parameters()):
        set_module_tensor_to_device(model, pname, "cpu", value=torch.randn(p.shape) * 0.02)
    model.tie_weights()
    return model


def child(scenario: str, folder: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM

    import emloc  # noqa: F401
    from emloc.artifacts import peak_rss_mb

    out: dict = {"scenario": scenario, "rss_after_imports": _rss_now()}
    t0 = time.time()
    if scenario in FACTORIZE:
        from emloc.lowrank import factorize

        m, n = FACTORIZE[scenario]
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, dtype=torch.float64, generator=g)
        gram = a @ a.T
        del a
        w = torch.randn(m, n, dtype=torch.float64, generator=g)
        out["rss_before"] = _rss_now()
        factorize(w, gram, rank_for := max(1, m * n // (2 * (m + n))))
        out["rank"] = rank_for
    elif scenario != "imports":
        if scenario.startswith("emloc_"):
            model = _emulator_model(folder, float(scenario.split("_")[1]))
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        out["params"] = sum(p.numel() for p in model.parameters())
        out["rss_after_load"] = _rss_now()
        ids, mask, labels = _batch(model.config.vocab_size)
        if scenario == "inference":
            model.eval()
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=True).logits
            out["logits_dtype"] = str(logits.dtype)
        else:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(0)
            net = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=16, target_modules=PROJ, task_type="CAUSAL_LM"))
            if scenario == "lora_ckpt":
                net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                net.enable_input_require_grads()
            trainable = [p for p in net.parameters() if p.requires_grad]
            out["lora_params"] = sum(p.numel() for p in trainable)
            opt = torch.optim.AdamW(trainable, lr=1e-4)
            net.train()
            for _ in range(2):
                if scenario == "lora_chunked":
                    from emloc.loss import answer_nll

                    nll, n = answer_nll(net, {"input_ids": ids, "attention_mask": mask, "labels": labels}, chunk=LOSS_CHUNK)
                    (nll / n).backward()
                    loss = (nll / n).detach()
                else:  # the output (and so the logits) stays alive through backward
                    out_ = net(input_ids=ids, attention_mask=mask, labels=labels)
                    out_.loss.backward()
                    loss = out_.loss.detach()
                opt.step()
                opt.zero_grad(set_to_none=True)
            out["loss"] = float(loss)
    out["seconds"] = round(time.time() - t0, 1)
    out["peak_rss"] = peak_rss_mb() * 2**20  # this process only (ru_maxrss would carry the parent's at fork)
    return out


def measure(scenarios: list[str], folder: Path) -> dict[str, dict]:
    results = {}
    for s in scenarios:  # strictly one process at a time
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        name = s
        if s.endswith(MMAP_SUFFIX):  # glibc: serve every allocation over 128 KiB by mmap, returned on free
            env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
            name = s[: -len(MMAP_SUFFIX)]
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--model", str(folder)], capture_output=True,
                              text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"scenario {s} failed:\n{proc.stderr[-3000:]}")
        results[s] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"measured {s}: peak RSS {results[s]['peak_rss'] / 2**30:.3f} GiB in {results[s]['seconds']} s",
              file=sys.stderr)
    return results


def compare(results: dict[str, dict], folder: Path) -> str:
    from emloc.plan import PlanConfig, predict

    def plan(ckpt: bool, chunk: int | None = None):
        return predict(folder, PlanConfig(method="svd", batch=BATCH, seq_len=SEQ, rank=RANK, dtype="fp32", device="cpu",
                                          gradient_checkpointing=ckpt, ratios=(1.0, 0.5), loss_chunk=chunk))

    p, pc = plan(False), plan(True)
    est = {"inference": p.inference, "lora": p.lora_training, "lora_ckpt": pc.lora_training,
           "emloc_0.5": p.training_at(0.5), "lora_chunked": plan(False, LOSS_CHUNK).lora_training}

    def g(x: float | None) -> str:
        return "-" if x is None else f"{x / 2**30:.3f}"

    rows = ["| scenario | predicted live | measured, MALLOC_MMAP_THRESHOLD_=131072 | predicted incl. slack "
            "| measured, default glibc | predicted / measured (default) |", "|---|---:|---:|---:|---:|---:|"]
    for s in SCENARIOS:
        mmap = results.get(s + MMAP_SUFFIX, {}).get("peak_rss")
        plain = results.get(s, {}).get("peak_rss")
        if mmap is None and plain is None:
            continue
        if s == "imports":
            live = full = p.overhead
        else:
            full = est[s].total
            live = full - est[s].parts.get("allocator slack", 0)
        ratio = f"{full / plain:.2f}" if plain else "-"
        rows.append(f"| {s} | {g(live)} | {g(mmap)} | {g(full)} | {g(plain)} | {ratio} |")
    from emloc.plan import svd_workspace

    for s, (m, n) in FACTORIZE.items():
        r = results.get(s + MMAP_SUFFIX)
        if r:  # the Gram and W are resident before the call; svd_workspace counts W, not the Gram
            pred = svd_workspace(m, n, 8) - m * n * 8
            rows.append(f"| {s} {m}x{n}, extra over W and G | {g(pred)} | {g(r['peak_rss'] - r['rss_before'])} "
                        f"| - | - | - |")
    rows.append("\n(GiB = 2^30 bytes; 'live' = tensors + runtime overhead, 'slack' = CPU_ALLOCATOR_SLACK x L x BT x A)")
    emu = results.get("emloc_0.5") or results.get("emloc_0.5" + MMAP_SUFFIX)
    if emu:
        rows.append(f"emulator params at 0.5: predicted {p.training_at(0.5).params:,}, built {emu['params']:,}")
    lora = results.get("lora") or results.get("lora" + MMAP_SUFFIX)
    if lora:
        rows.append(f"LoRA params: predicted {p.lora_params:,}, PEFT {lora['lora_params']:,}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--child")
    ap.add_argument("--only", help="comma-separated scenarios (default: all)")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    ap.add_argument("--from-json", type=Path, help="compare earlier measurements instead of measuring")
    ns = ap.parse_args()
    if ns.child:
        print(json.dumps(child(ns.child, ns.model)))
        return
    if ns.from_json:
        results = json.loads(ns.from_json.read_text())
    else:
        default = list(SCENARIOS) + [s + MMAP_SUFFIX for s in SCENARIOS if s != "imports"] + \
            [s + MMAP_SUFFIX for s in FACTORIZE]
        results = measure(ns.only.split(",") if ns.only else default, ns.model)
    if ns.json:
        ns.json.write_text(json.dumps(results, indent=2) + "\n")
    print(compare(results, ns.model))


if __name__ == "__main__":
    main()
