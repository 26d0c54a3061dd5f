"""`emloc run`: build -> train -> correct -> eval, ending with a side-by-side table.

Every stage runs in a fresh process (`_isolated`), as the stage commands would, so that each
stage's peak memory is its own; the table sets each beside the peak of evaluating the original
model (its inference) measured in the same run.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import (MEASURE_THRESHOLD, Stopwatch, check_output, peak_memory_mb, read_manifest, return_freed_memory,
                        versions, write_json)
from .correct import CorrectConfig, correct_adapter
from .data import DEFAULT_TASK, default_task
from .emulator import EmulatorConfig, build_emulator
from .evaluate import EvalConfig, evaluate
from .models import resolve_model
from .train import TrainConfig, train_adapter

log = logging.getLogger("emloc")


def _child_setup(level: int) -> None:
    from .cli import _quiet_libraries

    logging.basicConfig(level=level, format="emloc: %(levelname)s: %(message)s")
    _quiet_libraries()
    return_freed_memory(MEASURE_THRESHOLD)  # the table compares peaks: memory in use, not glibc's reserve


def _isolated(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `fn(*args, **kwargs)` in a fresh process whose allocator returns freed memory (peaks are memory in use)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_child_setup,
                             initargs=(logging.getLogger("emloc").getEffectiveLevel(),)) as pool:
        return pool.submit(fn, *args, **kwargs).result()


@dataclass
class RunConfig:
    """Settings of `run_pipeline`: one config per stage.

    Attributes:
        base: model folder or packaged model name.
        data: JSONL training data (None: the embedded default task).
        eval_data: JSONL held-out data (None: the default task's held-out split, or 10% of `data`).
        emulator: settings of the build stage.
        train: settings of the LoRA stage.
        correct: settings of the correction stage.
        eval: settings of the evaluations.
        compare_emulator_alone: also evaluate the emulator without LoRA.
        task: embedded task (`emloc.data.TASKS`) used when `data` is None.
    """

    base: str = "smollm2-135m"
    data: str | None = None
    eval_data: str | None = None
    # the measured-best emulator (`auto`: int8 at the default 0.5; the `budget` bench: 99.9% of LoRA's
    # gain over 3 seeds against 83% for SVD); with this stage's micro-batches of 2 and checkpointing,
    # an int8 step of SmolLM2 took 9.7 s against 7.1 s for the SVD emulator (fp32, 2 CPU cores, 4 steps
    # each); `--method svd` gives the paper's
    emulator: EmulatorConfig = field(default_factory=lambda: EmulatorConfig(method="auto"))
    # checkpointing and micro-batches of 2 keep training under the original's inference peak (the table
    # shows it: 975 against 1216 MB with the int8 emulator; with the SVD one, micro-batches of 8
    # reached it exactly, 1112 MB); 30 steps and a 32-record in-training eval (the held-out rows are
    # evaluated after) keep the demo near 18 minutes on 2 AVX2 cores with every stage's memory
    # returned to the OS
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=30, max_length=256, eval_every=0, lr=3e-4,
                                                                   micro_batch_size=2, eval_samples=32,
                                                                   gradient_checkpointing=True))
    correct: CorrectConfig = field(default_factory=CorrectConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(max_length=256, exact_match=False))
    compare_emulator_alone: bool = True
    task: str = DEFAULT_TASK


def run_pipeline(output: str | Path, config: RunConfig | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run every stage into `output` and return the results table.

    The folder gets `emulator/`, `adapter/`, `corrected/`, `eval/<row>.json`, `results.json` and
    `results.md`.
    """
    cfg = config or RunConfig()
    watch = Stopwatch()
    out = check_output(output, overwrite, (cfg.base, cfg.data, cfg.eval_data))
    base = resolve_model(cfg.base)
    if cfg.data is None:
        train_file, eval_file = default_task(cfg.task)
        task = cfg.task
    else:
        train_file, eval_file = Path(cfg.data), Path(cfg.eval_data) if cfg.eval_data else None
        task = str(train_file)
    out.mkdir(parents=True, exist_ok=True)
    emu = _isolated(build_emulator, base, train_file, out / "emulator", cfg.emulator, overwrite=True)
    adapter = _isolated(train_adapter, emu, train_file, out / "adapter", cfg.train, eval_data=eval_file, overwrite=True)
    corrected = _isolated(correct_adapter, adapter, out / "corrected", config=cfg.correct, overwrite=True)
    held = eval_file or train_file
    rows_spec = [("zero-shot original", base, None)]
    if cfg.compare_emulator_alone:
        rows_spec.append(("emulator, no LoRA", emu, None))
    rows_spec += [("emulator + LoRA", emu, adapter), ("original + uncorrected LoRA", base, adapter),
                  (f"original + corrected LoRA ({_mode_label(corrected)})", base, corrected)]
    rows = []
    for name, model, ad in rows_spec:
        log.info("evaluating: %s", name)
        slug = name.replace(" ", "_").replace(",", "").replace("+", "plus")
        r = _isolated(evaluate, model, held, ad, cfg.eval, out / "eval" / f"{slug}.json", overwrite=True)
        rows.append({"row": name, "nll": r["nll"], "ppl": r["ppl"], "exact_match": r.get("exact_match"),
                     "records": r["records"], "answer_tokens": r["answer_tokens"], "peak_rss_mb": r.get("peak_rss_mb")})
    zero = rows[0]["nll"]
    for r in rows:
        r["gain_vs_zero_shot"] = zero - r["nll"]
    emanifest, cmanifest = read_manifest(emu), read_manifest(corrected)
    inference = rows[0]["peak_rss_mb"]
    memory = [{"stage": stage, "peak_rss_mb": m.get("peak_rss_mb"), "vs_inference": m.get("peak_rss_mb", 0) / inference}
              for stage, m in (("build (emulator)", emanifest), ("train (LoRA on the emulator)", read_manifest(adapter)),
                               ("correct", cmanifest))] if inference else []
    result = {
        "base": str(base), "task": task, "eval_data": str(held), "config": cfg, "rows": rows,
        "emulator_params": emanifest["params"], "emulator_bytes": emanifest.get("bytes"), "calibration": emanifest["calibration"],
        "clamped_directions": cmanifest.get("clamped_directions"), "directions": cmanifest.get("directions"),
        "inference_peak_rss_mb": inference, "memory": memory, "versions": versions(), "wall_seconds": round(watch.seconds, 1), **peak_memory_mb(),
    }
    write_json(out / "results.json", result)
    table = format_table(result)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(watch.summary("run", out))
    return result


def format_table(result: dict[str, Any]) -> str:
    p, b = result["emulator_params"], result.get("emulator_bytes")
    # a quantised emulator keeps every parameter: its size is in bytes of the block linears
    size = (f"{b['fraction']:.1%} of the block linears' bytes (in bf16), {p['emulator'] / 1e6:.1f}M parameters" if b
            else f"{p['emulator'] / 1e6:.1f}M of {p['base'] / 1e6:.1f}M parameters ({p['emulator'] / p['base']:.0%})")
    lines = [
        f"base: {Path(result['base']).name}, task: {result['task']}, emulator: {size}"
        + (f"; clamp fired in {result['clamped_directions']} of {result['directions']} directions"
           if result["clamped_directions"] else ""),
        "",
        "| row | held-out answer NLL | perplexity | gain vs zero-shot |" + (" exact match |" if any(r["exact_match"] is not None for r in result["rows"]) else ""),
        "|---|---|---|---|" + ("---|" if any(r["exact_match"] is not None for r in result["rows"]) else ""),
    ]
    for r in result["rows"]:
        em = f" {r['exact_match']:.3f} |" if r["exact_match"] is not None else ""
        lines.append(f"| {r['row']} | {r['nll']:.4f} | {r['ppl']:.2f} | {r['gain_vs_zero_shot']:+.4f} |{em}")
    if result.get("memory"):
        lines += ["", f"Peak memory of each stage (its own process) against inference of the original (its zero-shot "
                      f"evaluation, {result['inference_peak_rss_mb']:.0f} MB):", "",
                  "| stage | peak RSS (MB) | / inference |", "|---|---|---|"]
        lines += [f"| {m['stage']} | {m['peak_rss_mb']:.0f} | {m['vs_inference']:.2f} |" for m in result["memory"]]
    return "\n".join(lines)


def _mode_label(corrected: Path) -> str:
    """`weighted`, `paper (L=3)`, ... and for mode auto which one it chose: `auto: weighted`."""
    m = read_manifest(corrected) or {}
    mode, cfg = m.get("mode", "?"), m.get("config", {})
    label = f"paper, L={cfg.get('clamp')}" if mode == "paper" else mode
    return f"auto: {label}" if cfg.get("mode") == "auto" else label

