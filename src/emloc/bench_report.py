"""The bench's report: per-row recovered fraction, the spread over seeds, the Markdown table and the
quality-against-memory plot (`emloc bench` writes report.json, report.md, quality_vs_memory.png)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

EXTRA_METRICS = ("prior_loss", "new_class_accuracy", "prior_accuracy")  # from a bench's `extra_eval` and `scorer`


def machine() -> str:
    """One line describing the machine: OS, CPU model and cores, memory, GPU if any."""
    import platform

    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{platform.system()} {platform.machine()}", f"{cpu}, {os.cpu_count()} cores",
             f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"]
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
    return ", ".join(parts)


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two adapter folders hold the same tensors (names, shapes and values)."""
    from safetensors.torch import load_file

    from .correct import ADAPTER_WEIGHTS

    fa, fb = a / ADAPTER_WEIGHTS, b / ADAPTER_WEIGHTS
    if not (fa.is_file() and fb.is_file()):
        return False
    x, y = load_file(fa), load_file(fb)
    return x.keys() == y.keys() and all(x[k].shape == y[k].shape and bool((x[k] == y[k]).all()) for k in x)


def _recovered(rows: list[dict[str, Any]]) -> None:
    """(zero-shot NLL - NLL) / (zero-shot NLL - full LoRA NLL), per seed."""
    for row in rows:
        zero = next((x["nll"] for x in rows if x["method"] == "zero-shot original" and x["seed"] == row["seed"]), None)
        full = next((x["nll"] for x in rows if x["method"] == "LoRA on the original" and x["seed"] == row["seed"]), None)
        if zero is not None and full is not None and zero != full:
            row["recovered"] = (zero - row["nll"]) / (zero - full)


def seed_spread(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, sample standard deviation, min and max over seeds of every (method, ratio) run with 2+ seeds."""
    import statistics

    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for x in rows:
        groups.setdefault((x["method"], x["ratio"]), []).append(x)
    out = []
    for (method, ratio), xs in groups.items():
        if len({x["seed"] for x in xs}) < 2:
            continue
        item: dict[str, Any] = {"method": method, "ratio": ratio, "seeds": ", ".join(str(x["seed"]) for x in xs)}
        for key in ("nll", "recovered", "exact_match"):
            vals = [x[key] for x in xs if x.get(key) is not None]
            if len(vals) == len(xs):
                item.update({f"{key}_mean": statistics.fmean(vals), f"{key}_std": statistics.stdev(vals),
                             f"{key}_min": min(vals), f"{key}_max": max(vals)})
        out.append(item)
    return out


def _cfg(report: dict[str, Any]) -> dict[str, Any]:
    c = report.get("config") or {}
    return c if isinstance(c, dict) else vars(c)


def format_report(report: dict[str, Any]) -> str:
    metric = report.get("metric", "NLL")
    extras = [k for k in EXTRA_METRICS if any(x.get(k) is not None for x in report["rows"])]
    extra_head = "".join(f" {k.replace('_', ' ')} |" for k in extras)
    lines = [f"`{report['command']}`" if report["command"] else "", "",
             f"base: {Path(report['base']).name}, task: {report['task']}, versions: "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"machine: {report.get('machine', '?')}; dtype of the frozen weights: {_cfg(report).get('dtype', 'auto')}", "",
             f"| method | ratio | bytes | seed | held-out {metric} | recovered | exact match | frozen weights trained on (MB) | train peak RSS (MB) "
             f"| s/step |{extra_head}", "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(extras)]
    for x in report["rows"]:
        rec = f"{x['recovered']:.1%}" if x.get("recovered") is not None else "-"
        em = f"{x['exact_match']:.3f}" if x.get("exact_match") is not None else "-"
        # rows from before model_bytes was recorded: their parameter count leaves quantised codes out
        tp = f"{x['trained_model_bytes'] / 2**20:.0f}" if x.get("trained_model_bytes") else "-"
        mem = f"{x['train_peak_rss_mb']:.0f}" if x.get("train_peak_rss_mb") else "-"
        sps = f"{x['seconds_per_step']:.2f}" if x.get("seconds_per_step") else "-"
        method = x["method"] + (f" → {x['chosen']}" if x.get("chosen") else "")
        nbytes = f"{x['bytes_fraction']:.3f}" if x.get("bytes_fraction") is not None else "-"
        more = "".join(f" {x[k]:.4g} |" if x.get(k) is not None else " - |" for k in extras)
        lines.append(f"| {method} | {x['ratio'] if x['ratio'] is not None else '-'} | {nbytes} | {x['seed']} | {x['nll']:.4f} | {rec} | "
                     f"{em} | {tp} | {mem} | {sps} |{more}")
    spread = seed_spread(report["rows"])
    if spread:
        lines += ["", "Spread over seeds (mean ± sample standard deviation, min..max):", "",
                  f"| method | ratio | seeds | held-out {metric} | recovered | exact match |", "|---|---|---|---|---|---|"]
        for x in spread:
            rec = (f"{x['recovered_mean']:.1%} ± {x['recovered_std']:.1%} ({x['recovered_min']:.1%}..{x['recovered_max']:.1%})"
                   if x.get("recovered_mean") is not None else "-")
            em = f"{x['exact_match_mean']:.3f} ± {x['exact_match_std']:.3f}" if x.get("exact_match_mean") is not None else "-"
            lines.append(f"| {x['method']} | {x['ratio'] if x['ratio'] is not None else '-'} | {x['seeds']} | "
                         f"{x['nll_mean']:.4f} ± {x['nll_std']:.4f} | {rec} | {em} |")
    lines += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in report["not_run"].items())]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    points = [x for x in rows if x.get("train_peak_rss_mb") is not None and x["seed"] == rows[0]["seed"]]
    # rows of one emulator share its training peak and often nearly its NLL, so the points carry
    # numbers and the legend (outside the axes) names them
    for i, x in enumerate(points, 1):
        label = f"{i}: {x['method']}" + (f" {x['ratio']}" if x["ratio"] else "") + f" ({x['nll']:.3f})"
        ax.scatter(x["train_peak_rss_mb"], x["nll"], label=label)
        ax.annotate(str(i), (x["train_peak_rss_mb"], x["nll"]), fontsize=7, xytext=(4, 2 - 8 * (i % 2)),
                    textcoords="offset points")
    zero = next((x["nll"] for x in rows if x["method"] == "zero-shot original"), None)
    if zero is not None:
        ax.axhline(zero, ls="--", lw=0.8, color="gray", label=f"zero-shot ({zero:.3f})")
    if points or zero is not None:
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xlabel("training peak RSS (MB)")
    ax.set_ylabel(f"held-out {rows[0].get('metric', 'answer NLL') if rows else 'answer NLL'} (lower is better)")
    nlls = [x["nll"] for x in points] + ([zero] if zero is not None else [])
    if nlls and min(nlls) > 0 and max(nlls) / min(nlls) > 20:
        ax.set_yscale("log")  # one failed row (e.g. plain SVD) would flatten the others
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
