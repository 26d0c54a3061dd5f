"""Bench rows of the baseline and remedy beyond EMLoC's own: QLoRA and top-K refinement on the original
(see `BenchConfig`)."""

from __future__ import annotations

from typing import Any

from .bench_runner import _row


def _names(method: str) -> tuple[str, str, tuple[str, ...]]:
    """(artifact tag, row label, build flags) of an emulator method (svd keeps its old names: benches resume)."""
    tag = "" if method == "svd" else method.replace("+", "-") + "-"
    return tag, "EMLoC" if method == "svd" else f"EMLoC {method}", () if method == "svd" else ("--method", method)


def refine_row(r: Any, method: str, q: float, s: int, base: str, train_f: str, eval_f: str) -> dict[str, Any]:
    """Remedy: the EMLoC adapter (weighted correction) refined on the original, LoRA of the last K blocks only."""
    tag, label, flags = _names(method)
    emu = r.build(f"emulator-{tag}{q}", base, train_f, q, r.cfg.samples, *flags)
    wc = r.correct(f"weighted-{tag}{q}-s{s}", r.train(f"adapter-{tag}{q}-s{s}", str(emu), train_f, eval_f, s), None, "weighted")
    k, steps = str(r.cfg.refine_blocks), str(max(1, r.cfg.steps // 2))
    out = r.train(f"refine-{tag}{q}-s{s}", base, train_f, eval_f, s, "--init-adapter", str(wc), "--last-blocks", k, "--steps", steps)
    row = _row(f"remedy: {label} (weighted) + last-{k}-block refinement on the original, {steps} steps", q, s,
               r.eval(f"refine-{tag}{q}-s{s}", base, eval_f, out), build=emu, train=out)
    return row


def qlora_rows(r: Any, s: int, on_nf4: bool, base: str, train_f: str, eval_f: str) -> list[dict[str, Any]]:
    """QLoRA: LoRA trained on an NF4 copy of the base (bitsandbytes), on the original; and on the NF4 copy."""
    ad = r.train(f"qlora-s{s}", base, train_f, eval_f, s, "--quantize", "nf4")
    rows = [_row("QLoRA (NF4 base), on the original", None, s, r.eval(f"qlora-s{s}", base, eval_f, ad), train=ad)]
    if on_nf4:
        rows.append(_row("QLoRA (NF4 base), on the NF4 model", None, s,
                         r.eval(f"qlora-nf4-s{s}", base, eval_f, ad, "--quantize", "nf4"), train=ad))
    return rows

