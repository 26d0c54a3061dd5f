"""The `emloc` command line: each verb parses its flags and calls one library function.

Flags are generated from the stage's config dataclass (names, types, defaults and the help text of
its docstring), so the library and the CLI cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import types
import typing
import warnings
from typing import Any, Callable

from .errors import EmlocError


def _field_help(cls: type) -> dict[str, str]:
    """Parse `name: text` entries from the Attributes section of a dataclass docstring."""
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    current = None
    for line in doc.split("Attributes:", 1)[-1].splitlines():
        m = re.match(r"\s{8}(\w+): (.*)", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "null") else float(text)


def add_config_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), prefix: str = "") -> None:
    """Add one flag per dataclass field (`micro_batch_size` -> `--micro-batch-size`)."""
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict[str, Any] = {"dest": prefix.replace("-", "_") + f.name, "default": default,
                              "help": f"{helps.get(f.name, '')} (default: {default})"}
        args = typing.get_args(hint)
        base = hint
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            non_none = [a for a in args if a is not type(None)]
            base = non_none[0] if len(non_none) == 1 else str
            if base is float:
                kw["type"] = _optional_float
                kw["metavar"] = "FLOAT|none"
            elif base is int:
                kw["type"] = lambda s: None if s.lower() == "none" else int(s)
            else:
                kw["type"] = str
        elif base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = base
        parser.add_argument(flag, **kw)


def build_config(cls: type, ns: argparse.Namespace, prefix: str = "", **overrides: Any):
    values = {f.name: getattr(ns, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(ns, prefix + f.name)}
    values.update(overrides)
    return cls(**values)


def _ratio(ns: argparse.Namespace):
    from .emulator import parse_ratio_table

    if ns.ratio_table:
        return parse_ratio_table(ns.ratio_table)
    try:
        return float(ns.ratio)
    except ValueError:
        raise EmlocError(f"--ratio {ns.ratio!r} is not a number; give a fraction in (0, 1] or use --ratio-table FILE") from None


# ------------------------------------------------------------------------------------------ verbs

def cmd_build(ns: argparse.Namespace) -> None:
    from .emulator import EmulatorConfig, build_emulator

    ratio = _ratio(ns)
    if ns.budget:
        ratio = _ratio_for_budget(ns)
    build_emulator(ns.base, ns.calibration, ns.output, build_config(EmulatorConfig, ns, ratio=ratio), ns.overwrite)


def _ratio_for_budget(ns: argparse.Namespace) -> float:
    """The largest ratio whose every stage fits `--budget`, from `emloc plan`'s predictions."""
    from .models import parse_device, resolve_model
    from .plan import PlanConfig, parse_size, predict, stats_dtype_hint

    device = parse_device(ns.device).type
    dtype = "bf16" if ns.dtype == "auto" and device == "cuda" else ("fp32" if ns.dtype == "auto" else ns.dtype)
    cfg = PlanConfig(batch=ns.plan_batch, seq_len=ns.plan_seq_len, dtype=dtype, device=device, budget=parse_size(ns.budget),
                     stats_dtype=ns.stats_dtype, calibration_samples=ns.samples, calibration_len=ns.max_length,
                     method=ns.method if ns.method in ("auto", "svd", "quant", "svd+quant") else "svd",
                     vocab_format=ns.vocab_format)
    plan = predict(resolve_model(ns.base), cfg)
    rec = plan.recommend()
    if rec.ratio is None:
        raise EmlocError(rec.message + " Lower --plan-batch/--plan-seq-len, use --stats-dtype float32, or raise --budget")
    logging.getLogger("emloc").info("plan: %s", rec.message + stats_dtype_hint(plan, rec))
    if rec.ratio >= 1:
        raise EmlocError(f"{rec.message} Train LoRA on the original directly: emloc train --model {ns.base}")
    return rec.ratio


def cmd_plan(ns: argparse.Namespace) -> None:
    from .plan import PlanConfig, format_plan, parse_size, predict

    try:
        ratios = tuple(float(r) for r in ns.ratios.split(",")) if ns.ratios else PlanConfig().ratios
    except ValueError:
        raise EmlocError(f"--ratios {ns.ratios!r} must be comma-separated numbers, e.g. 1,0.5,0.25") from None
    cfg = build_config(PlanConfig, ns, ratios=ratios, budget=parse_size(ns.budget) if ns.budget else None,
                       host_budget=parse_size(ns.host_budget) if ns.host_budget else None)
    print(format_plan(predict(ns.base, cfg)))


def cmd_train(ns: argparse.Namespace) -> None:
    from .train import TrainConfig, train_adapter

    train_adapter(ns.model, ns.data, ns.output, build_config(TrainConfig, ns), ns.overwrite, eval_data=ns.eval_data)


def cmd_correct(ns: argparse.Namespace) -> None:
    from .correct import CorrectConfig, correct_adapter

    correct_adapter(ns.adapter, ns.output, build_config(CorrectConfig, ns), ns.overwrite, emulator=ns.emulator, base=ns.base)


def cmd_merge(ns: argparse.Namespace) -> None:
    from .merge import merge_adapter

    merge_adapter(ns.base, ns.adapter, ns.output, ns.overwrite)


def cmd_eval(ns: argparse.Namespace) -> None:
    import json

    from .evaluate import EvalConfig, evaluate

    r = evaluate(ns.model, ns.data, ns.adapter, ns.output, build_config(EvalConfig, ns), ns.overwrite)
    keys = ("metric", "loss", "nll", "ppl", "exact_match", "em_records", "records", "answer_tokens")
    print(json.dumps({k: r[k] for k in keys if k in r}))


def cmd_run(ns: argparse.Namespace) -> None:
    from .correct import CorrectConfig
    from .emulator import EmulatorConfig
    from .evaluate import EvalConfig
    from .pipeline import RunConfig, run_pipeline
    from .train import TrainConfig

    d = RunConfig()
    emu = dataclasses.replace(d.emulator, ratio=_ratio(ns), method=ns.method, samples=ns.samples, seed=ns.seed, device=ns.device,
                              dtype=ns.dtype)
    tr = dataclasses.replace(d.train, steps=ns.steps, rank=ns.rank, alpha=ns.alpha, lr=ns.lr, batch_size=ns.batch_size,
                             micro_batch_size=ns.micro_batch_size, seed=ns.seed, device=ns.device, dtype=ns.dtype,
                             gradient_checkpointing=ns.gradient_checkpointing)
    co = CorrectConfig(mode=ns.mode, clamp=ns.clamp)
    ev = dataclasses.replace(d.eval, samples=ns.eval_samples, exact_match=ns.exact_match, device=ns.device, dtype=ns.dtype)
    assert isinstance(emu, EmulatorConfig) and isinstance(tr, TrainConfig) and isinstance(ev, EvalConfig)
    run_pipeline(ns.output, RunConfig(ns.base, ns.data, ns.eval_data, emu, tr, co, ev, task=ns.task), ns.overwrite)


def cmd_bench(ns: argparse.Namespace) -> None:
    from .bench import PRESETS, run_bench

    if ns.preset not in PRESETS:
        raise EmlocError(f"unknown preset {ns.preset!r}; use one of {', '.join(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[ns.preset], device=ns.device)
    if ns.steps is not None:
        cfg = dataclasses.replace(cfg, steps=ns.steps)
    if ns.seeds:
        cfg = dataclasses.replace(cfg, seeds=tuple(ns.seeds))
    if ns.ratios:
        cfg = dataclasses.replace(cfg, ratios=tuple(ns.ratios), seeded_ratios=min(cfg.seeded_ratios, len(ns.ratios)))
    if ns.task:
        cfg = dataclasses.replace(cfg, task=ns.task)
    if ns.data:
        cfg = dataclasses.replace(cfg, data=ns.data, eval_data=ns.eval_data)
    if ns.base:
        cfg = dataclasses.replace(cfg, base=ns.base)
    out = ns.output or f"bench-{ns.preset}"
    run_bench(out, cfg, command="emloc " + " ".join(ns.argv), report_only=ns.report_only, only=tuple(ns.only or ()))


def _build_flags(b: argparse.ArgumentParser) -> None:
    from .emulator import EmulatorConfig

    b.add_argument("--base", required=True, help="model folder or packaged model name (e.g. smollm2-135m)")
    b.add_argument("--calibration", help="JSONL downstream data to calibrate on (required)")
    b.add_argument("--output", required=True, help="emulator folder to create")
    b.add_argument("--ratio", default="0.5", help="fraction of each layer's bytes to keep (counted in bfloat16; for svd: of its parameters), in (0, 1] (default: 0.5)")
    b.add_argument("--ratio-table", help="JSON/YAML list of [regex, ratio|skip] rules, first match wins")
    b.add_argument("--budget", help="memory budget (e.g. 24GB): pick the largest ratio whose every stage fits, "
                   "as `emloc plan` predicts; overrides --ratio")
    b.add_argument("--plan-batch", type=int, default=1, help="training batch assumed by --budget (default: 1)")
    b.add_argument("--plan-seq-len", type=int, default=2048, help="training sequence length assumed by --budget (default: 2048)")
    add_config_flags(b, EmulatorConfig, skip=("ratio",))


def _train_flags(t: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    t.add_argument("--model", required=True, help="emulator folder (or model folder / packaged name)")
    t.add_argument("--data", required=True, help="JSONL training data")
    t.add_argument("--eval-data", help="JSONL held-out data (default: hold out --eval-fraction of --data)")
    t.add_argument("--output", required=True, help="adapter folder to create")
    add_config_flags(t, TrainConfig)


def _correct_flags(c: argparse.ArgumentParser) -> None:
    from .correct import CorrectConfig

    c.add_argument("--adapter", required=True, help="adapter trained on the emulator")
    c.add_argument("--output", required=True, help="corrected adapter folder to create")
    c.add_argument("--emulator", help="emulator the adapter was trained on (default: from the adapter)")
    c.add_argument("--base", help="original model (default: from the emulator's manifest)")
    add_config_flags(c, CorrectConfig)


def _merge_flags(m: argparse.ArgumentParser) -> None:
    m.add_argument("--adapter", required=True, help="corrected adapter (output of `emloc correct`)")
    m.add_argument("--output", required=True, help="merged model folder to create")
    m.add_argument("--base", help="original model (default: from the adapter)")


def _eval_flags(e: argparse.ArgumentParser) -> None:
    from .evaluate import EvalConfig

    e.add_argument("--model", required=True, help="model folder, packaged name or emulator folder")
    e.add_argument("--data", required=True, help="JSONL held-out data")
    e.add_argument("--adapter", help="PEFT adapter to apply")
    e.add_argument("--output", help="JSON file for the results")
    add_config_flags(e, EvalConfig)


def _plan_flags(pl: argparse.ArgumentParser) -> None:
    from .plan import PlanConfig

    pl.add_argument("--base", help="model folder (config.json is enough) or a converted packaged name (required)")
    pl.add_argument("--budget", help="memory of the compute device, e.g. 24GB (GB = 2^30 bytes)")
    pl.add_argument("--host-budget", help="host memory for correct/merge when --device cuda, e.g. 64GB")
    pl.add_argument("--ratios", help="comma-separated candidate ratios (default: 1,0.75,0.5,0.4,0.3,0.25,0.2,0.15,0.1)")
    add_config_flags(pl, PlanConfig, skip=("ratios", "budget", "host_budget"))


def _bench_flags(bn: argparse.ArgumentParser) -> None:
    bn.add_argument("--preset", default="smoke", help="smoke, small, qwen, bigger-in-budget, budget, budget-qwen, vlm or diffusion (default: smoke)")
    bn.add_argument("--output", help="report folder (default: ./bench-PRESET); finished rows are reused on a rerun")
    bn.add_argument("--steps", type=int, help="override the preset's training steps")
    bn.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds (finished rows are reused)")
    bn.add_argument("--ratios", type=float, nargs="+", help="override the preset's emulator ratios (finished rows are reused)")
    bn.add_argument("--report-only", action="store_true", help="write the report from the finished rows; run nothing")
    bn.add_argument("--only", nargs="+", metavar="ROW", help="run only these unfinished rows (names of OUTPUT/rows/*.json, "
                    "shell patterns allowed, e.g. 'emloc-quant-0.25-s*'); the report lists the others as not run")
    bn.add_argument("--task", help="embedded task: chatterbot-topic (short answers, exact match), chatterbot-en or "
                    "easy-vqa (image records, for a vision-language base) (default: the preset's)")
    bn.add_argument("--base", help="model folder or packaged name to benchmark (default: the preset's)")
    bn.add_argument("--data", help="JSONL training data (default: the embedded task)")
    bn.add_argument("--eval-data", help="JSONL held-out data")
    bn.add_argument("--device", default="auto", help="auto, cpu or cuda")


def _run_flags(r: argparse.ArgumentParser) -> None:
    """The pipeline's flags: a chosen few of each stage's, with the defaults of `RunConfig`."""
    from .pipeline import RunConfig

    d = RunConfig()
    d_emu, d_tr, d_co = d.emulator, d.train, d.correct
    r.add_argument("--base", default="smollm2-135m", help="model folder or packaged name (default: smollm2-135m)")
    r.add_argument("--task", default="chatterbot-en", help="embedded task when --data is not given: chatterbot-en "
                   "(default) or chatterbot-topic")
    r.add_argument("--data", help="JSONL training data (default: the embedded --task)")
    r.add_argument("--eval-data", help="JSONL held-out data")
    r.add_argument("--output", default="emloc-run", help="run folder (default: ./emloc-run)")
    r.add_argument("--ratio", default=str(d_emu.ratio), help=f"fraction of each layer's bytes to keep (default: {d_emu.ratio})")
    r.add_argument("--method", default=d_emu.method, help=f"emulator: svd, quant or svd+quant (default: {d_emu.method})")
    r.add_argument("--ratio-table", help="JSON/YAML list of [regex, ratio|skip] rules")
    r.add_argument("--samples", type=int, default=d_emu.samples, help=f"calibration records (default: {d_emu.samples})")
    r.add_argument("--steps", type=int, default=d_tr.steps, help=f"training steps (default: {d_tr.steps})")
    r.add_argument("--rank", type=int, default=d_tr.rank, help=f"LoRA rank (default: {d_tr.rank})")
    r.add_argument("--alpha", type=float, default=d_tr.alpha, help=f"LoRA alpha (default: {d_tr.alpha})")
    r.add_argument("--lr", type=float, default=d_tr.lr, help=f"learning rate (default: {d_tr.lr:g})")
    r.add_argument("--batch-size", type=int, default=d_tr.batch_size, help=f"global batch (default: {d_tr.batch_size})")
    r.add_argument("--micro-batch-size", type=int, default=d_tr.micro_batch_size, help="records per forward pass")
    r.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=d_tr.gradient_checkpointing,
                   help=f"recompute block activations in training (default: {d_tr.gradient_checkpointing})")
    r.add_argument("--mode", default=d_co.mode, help=f"correction: auto, weighted, paper or none (default: {d_co.mode})")
    r.add_argument("--clamp", type=_optional_float, default=d_co.clamp, help=f"clamp L of --mode paper, or none (default: {d_co.clamp:g})")
    r.add_argument("--eval-samples", type=int, default=None, help="evaluate at most this many held-out records")
    r.add_argument("--exact-match", action=argparse.BooleanOptionalAction, default=False, help="also greedy exact match")
    r.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")


# The verbs, in the order `emloc --help` lists them: name, function, help, flags, overwrite.
# `overwrite`: how --overwrite reads for the verb (None: it writes no folder it could replace).
VERBS: tuple[tuple[str, Callable[[argparse.Namespace], None], str, Callable[[argparse.ArgumentParser], None], str | None], ...] = (
    ("build", cmd_build, "build an emulator of a base model, calibrated on downstream data", _build_flags,
     "replace a non-empty output folder"),
    ("train", cmd_train, "train a LoRA adapter on an emulator (or on any model, for comparison)", _train_flags,
     "replace a non-empty output folder"),
    ("correct", cmd_correct, "correct an emulator-trained adapter for the original model", _correct_flags,
     "replace a non-empty output folder"),
    ("merge", cmd_merge, "merge an adapter into the original model's weights", _merge_flags, "replace a non-empty output folder"),
    ("eval", cmd_eval, "held-out answer NLL / perplexity and exact match", _eval_flags, "replace an existing --output file"),
    ("plan", cmd_plan, "predict each stage's peak memory from the model's config and pick a ratio", _plan_flags, None),
    ("bench", cmd_bench, "run the side-by-side comparisons (each stage in its own process) and write a report", _bench_flags, None),
    ("run", cmd_run, "build -> train -> correct -> eval, with a comparison table (no arguments: the embedded demo)", _run_flags,
     "replace a non-empty output folder"),
)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emloc", description="Fine-tune a large model inside its inference memory (EMLoC).")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and the final summary")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, fn, help, flags, overwrite in VERBS:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        flags(sp)
        for old, new in RENAMED.get(name, {}).items():
            sp.add_argument(old, dest=f"renamed_{new}", help=argparse.SUPPRESS)
        if overwrite:
            sp.add_argument("--overwrite", action="store_true", help=overwrite)
    return p


# Flags renamed for one vocabulary (base, calibration...): verb -> {old flag: new dest}. The old name
# still works, with a warning, for one release.
RENAMED: dict[str, dict[str, str]] = {"build": {"--data": "calibration"}, "plan": {"--model": "base"}}
REQUIRED: dict[str, tuple[str, ...]] = {"build": ("calibration",), "plan": ("base",)}


def _resolve_renamed(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Map deprecated flags onto their new names (warning once each) and check the required ones."""
    for old, new in RENAMED.get(ns.verb, {}).items():
        value = getattr(ns, f"renamed_{new}", None)
        if value is None:
            continue
        flag = "--" + new.replace("_", "-")
        logging.getLogger("emloc").warning("%s is deprecated and will be removed in the next release; use %s", old, flag)
        if getattr(ns, new) is not None and getattr(ns, new) != value:
            parser.error(f"{old} and {flag} name the same input; give only {flag}")
        setattr(ns, new, value)
    missing = [f"--{d.replace('_', '-')}" for d in REQUIRED.get(ns.verb, ()) if getattr(ns, d, None) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _return_freed_memory() -> None:
    from .artifacts import return_freed_memory

    return_freed_memory()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `emloc` console script."""
    parser = make_parser()
    ns = parser.parse_args(argv)
    if ns.verb != "run":  # `run` sets its stage processes' allocator itself (emloc.pipeline)
        _return_freed_memory()
    ns.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.WARNING if ns.quiet else logging.INFO, format="emloc: %(levelname)s: %(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns of an optional kernel package on every import
    logging.captureWarnings(False)
    _resolve_renamed(ns, parser)
    _quiet_libraries()
    try:
        ns.fn(ns)
    except EmlocError as exc:
        print(f"emloc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emloc: interrupted; no output folder was left half-written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
