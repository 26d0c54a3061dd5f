"""`emloc bench`: the paper's comparisons on one base model and task, side by side.

Every training and every evaluation runs in its own process (`python -m emloc.cli`), so each
stage's peak memory is its own; the figures are read from the manifests and eval files the stages
write. Artifacts and finished rows are kept under the report folder, so an interrupted bench
resumes without redoing them. Rows that this version cannot run say so in the report instead of
being left out.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .artifacts import Stopwatch, read_manifest, to_jsonable, versions, write_json
from .bench_remedies import qlora_rows, refine_row
from .bench_runner import _row, _Runner
from .bench_report import _plot, _recovered, _same_tensors, format_report, machine, seed_spread
from .errors import EmlocError

log = logging.getLogger("emloc")


@dataclass
class BenchConfig:
    """Settings of `run_bench`.

    Attributes:
        base: model folder or packaged model name.
        task: embedded task (see `emloc.data.TASKS`) used when `data` is None.
        data: JSONL training data (None: the embedded `task`).
        eval_data: JSONL held-out data (None: the default task's held-out split).
        ratios: emulator ratios for the EMLoC rows.
        steps: training steps of every LoRA row.
        batch_size: global batch of every LoRA row.
        lr: learning rate of every LoRA row.
        rank: LoRA rank.
        alpha: LoRA alpha.
        max_length: tokens per record.
        samples: calibration records of the main EMLoC rows.
        eval_samples: held-out records evaluated (None: all).
        seeds: seeds of the main rows (LoRA on the original, QLoRA, EMLoC at the first `seeded_ratios`
            ratios); other ratios, the baselines and the ablations use the first seed.
        seeded_ratios: how many of `ratios` get every seed.
        seeded_methods: the emulator methods that get every seed (empty: all of `methods`).
        clamps: clamp values for the clamp ablation (None = no clamp).
        calibration_sizes: calibration sizes for the calibration ablation.
        plain_svd: add the plain (non-whitened) SVD ablation.
        seeded_plain_svd: run the plain SVD ablation at every ratio, with the main rows' seeds.
        energy_allocation: add the row whose emulator allocates ranks within each block by energy.
        sequential: add the sequential-calibration ablation.
        other_calibration: an embedded task whose training records calibrate an extra emulator (the
            off-task calibration ablation), or None.
        baselines: add the baseline emulators of `baseline_methods` at the first ratio.
        baseline_methods: which: `layer-drop` (Offsite-style) and/or `channel-prune`.
        methods: emulator methods of the EMLoC rows (`svd`, `quant`, `svd+quant`; see `emloc build
            --method`); a method that cannot reach a ratio's bytes is listed as not run there.
        qlora: add QLoRA rows (LoRA trained on an NF4 copy of the base with bitsandbytes, evaluated on
            the original and on the NF4 copy), seeded like the main rows.
        checkpointing: add the row of LoRA on the original with gradient checkpointing (and the
            chunked loss every row uses), for its training peak.
        gradient_checkpointing: every training row checkpoints its blocks (`emloc train
            --gradient-checkpointing`): the peaks then compare weights rather than activations.
        auto_correction: add the row of `emloc correct --mode auto` (the default) per EMLoC emulator.
        refine_blocks: K > 0 adds the top-K refinement rows (first seed): each EMLoC adapter
            (weighted correction) trained further on the original for steps / 2 steps, only the LoRA
            of the last K blocks, with exact gradients; and the control, LoRA on the original's last
            K blocks alone from scratch for the same steps.
        refine_methods: the emulator methods whose adapters get refinement rows (empty: all).
        rtn_ratios: ratios at which the `quant` emulator is also built with round-to-nearest instead
            of GPTQ (an ablation: what GPTQ's error feedback is worth, against the correction's share).
        scorer: a module whose `python -m MODULE score --model M [--adapter A] --output F [--grid PNG]`
            adds metrics to every evaluated row (e.g. `emloc.fashion`: generated-sample accuracy), or None.
        extra_eval: a file beside the training data also evaluated for every row, reported as
            `prior_loss` (e.g. the old classes of a DreamBooth-like task: prior preservation), or None.
        smaller: a smaller model of the same family to train with LoRA, or None. With it, the
            comparison in the budget (EMLoC on the base against LoRA on the smaller model) runs
            before LoRA on the original, which is over the budget by design.
        vocab_format: the EMLoC emulators' token embedding and output head (`emloc build --vocab-format`).
        vocab_ablations: formats of the ablation rows whose first quantised emulator (first seed and
            ratio) also stores its embedding and head in that format: what quantising them costs.
        stats_dtype: float64 or float32 statistics/SVD in the builds.
        dtype: dtype of the frozen weights in every build, training and evaluation (auto: bf16 on
            CUDA, fp32 on CPU; bfloat16 is 3-4x faster than fp32 on CPUs with AVX512-BF16).
        device: auto, cpu or cuda.
    """

    base: str = "smollm2-135m"
    task: str = "chatterbot-topic"
    data: str | None = None
    eval_data: str | None = None
    ratios: tuple[float, ...] = (0.5,)
    steps: int = 150
    batch_size: int = 8
    lr: float = 3e-4
    rank: int = 8
    alpha: float = 16.0
    max_length: int = 256
    samples: int = 64
    eval_samples: int | None = None
    seeds: tuple[int, ...] = (0,)
    seeded_ratios: int = 1
    seeded_methods: tuple[str, ...] = ()
    clamps: tuple[float | None, ...] = (1.0, 10.0, None)
    calibration_sizes: tuple[int, ...] = (8, 16, 256)
    plain_svd: bool = True
    seeded_plain_svd: bool = False
    energy_allocation: bool = True
    sequential: bool = True
    other_calibration: str | None = "chatterbot-en"
    baselines: bool = True
    baseline_methods: tuple[str, ...] = ("layer-drop", "channel-prune")
    methods: tuple[str, ...] = ("svd",)
    qlora: bool = False
    checkpointing: bool = False
    gradient_checkpointing: bool = False
    auto_correction: bool = True
    refine_blocks: int = 0
    refine_methods: tuple[str, ...] = ()
    rtn_ratios: tuple[float, ...] = ()
    scorer: str | None = None
    extra_eval: str | None = None
    smaller: str | None = None
    vocab_format: str = "keep"
    vocab_ablations: tuple[str, ...] = ()
    stats_dtype: str = "float64"
    dtype: str = "auto"
    device: str = "auto"


PRESETS: dict[str, BenchConfig] = {
    "smoke": BenchConfig(steps=2, batch_size=4, samples=8, eval_samples=12, max_length=96, clamps=(None,),
                         calibration_sizes=(4,), stats_dtype="float32"),
    "small": BenchConfig(ratios=(0.5, 0.75), steps=150, seeds=(0, 1, 2), clamps=(1.0, None), calibration_sizes=(8, 16, 256)),
    # the ablations run on `small`, except energy allocation (the lever that measured best there);
    # Qwen's frozen weights are bf16 (what a GPU uses; on a CPU with AVX512-BF16 it is 3-4x faster
    # than fp32), and 100 steps keep a CPU run near an hour
    "qwen": BenchConfig(base="qwen2.5-coder-0.5b", ratios=(0.5,), steps=100, dtype="bfloat16", clamps=(), calibration_sizes=(),
                        plain_svd=False, energy_allocation=True, sequential=False, other_calibration=None),
    # the 1.5B through EMLoC against LoRA on the 0.5B at about the same training memory: the 1.5B's
    # untied 151,936-entry embedding and head alone are 467M parameters (the 0.5B has 630M in all), so
    # only an emulator that also stores them quantised gets there: `emloc plan --batch 8 --seq-len 128
    # --method quant --vocab-format nf4` predicts 2.07 GB at 0.25 against 2.22 GB for LoRA on the 0.5B
    # (1.5B NF4 blocks alone: 2.70 GB). Every row checkpoints, so that the measured peaks compare
    # weights, not the 1.5B's larger activations. float32 statistics shorten the build. (An earlier
    # version ran SVD at 0.15, matching the parameter count: docs/bench/bigger-chatterbot-topic.md.)
    "bigger-in-budget": BenchConfig(base="qwen2.5-coder-1.5b", ratios=(0.25,), methods=("quant",), vocab_format="nf4", steps=100,
                                    dtype="bfloat16", gradient_checkpointing=True, smaller="qwen2.5-coder-0.5b", baselines=False, stats_dtype="float32",
                                    auto_correction=False, clamps=(), calibration_sizes=(), plain_svd=False, energy_allocation=False,
                                    sequential=False, other_calibration=None),
    # "what is the best adapter I can train in my memory?": every emulator method at 50% and 25% of the
    # block weights' bytes (bfloat16), against QLoRA and LoRA on the original with and without checkpointing
    "budget": BenchConfig(ratios=(0.5, 0.25), steps=50, auto_correction=False, seeds=(0, 1, 2), eval_samples=64, dtype="bfloat16", methods=("quant", "svd", "svd+quant"),
                          seeded_ratios=2, seeded_methods=("quant",), qlora=True, refine_blocks=4, vocab_ablations=("nf4",), refine_methods=("svd",), rtn_ratios=(0.25,), checkpointing=True, clamps=(), calibration_sizes=(), plain_svd=False,
                          energy_allocation=False, sequential=False, other_calibration=None, baselines=False),
    # on two CPU cores a Qwen row costs ~3x a SmolLM2 row (NF4 and QLoRA more): every method at the
    # first seed, the seeds for the quantised emulator (the default) and the baselines
    "budget-qwen": BenchConfig(base="qwen2.5-coder-0.5b", steps=50, auto_correction=False, seeds=(0, 1, 2), eval_samples=64, dtype="bfloat16",
                               methods=("quant", "svd", "svd+quant"), seeded_methods=("quant",), ratios=(0.5, 0.25), seeded_ratios=2, qlora=True,
                               refine_blocks=4, refine_methods=("svd",), checkpointing=True, clamps=(), vocab_ablations=("nf4",),
                               calibration_sizes=(), plain_svd=False, energy_allocation=False, sequential=False,
                               other_calibration=None, baselines=False),
    # a Flux-shaped denoiser (emloc.fashion: pretrained here on Fashion-MNIST classes 0-8) taught the
    # held-out class from 100 images; whitened (the default) against plain SVD (the reference code's)
    "diffusion": BenchConfig(base="fashion-flux-tiny", task="fashion-new-class", ratios=(0.5, 0.25), steps=100, batch_size=8,
                             lr=1e-3, seeds=(0, 1, 2), seeded_ratios=2, samples=32, dtype="float32", auto_correction=False,
                             clamps=(), calibration_sizes=(), plain_svd=True, seeded_plain_svd=True, energy_allocation=False, sequential=False,
                             other_calibration=None, baselines=True, baseline_methods=("layer-drop",), scorer="emloc.fashion", extra_eval="prior.jsonl"),
    # a vision-language model (emloc.vqa: the real SmolLM2-135M with a vision tower pretrained here on
    # easy-vqa captions) fine-tuned on easy-vqa's questions, which its pretraining never asked
    "vlm": BenchConfig(base="smollm2-vqa-135m", task="easy-vqa", ratios=(0.5, 0.25), steps=100, seeds=(0, 1, 2),
                       seeded_ratios=2, seeded_methods=("svd",), methods=("svd", "quant"), max_length=128, eval_samples=200, samples=128,
                       dtype="bfloat16", auto_correction=False, clamps=(), calibration_sizes=(), plain_svd=False,
                       energy_allocation=False, sequential=False, other_calibration=None, baselines=True),
}

NOT_RUN: dict[str, str] = {}
BASELINES = {"layer-drop": "Offsite-style emulator (layer drop)", "channel-prune": "pruning emulator (MLP channels)"}


def run_bench(output: str | Path, config: BenchConfig | None = None, command: str = "",
              report_only: bool = False, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run every row of the benchmark into `output` (resuming finished rows) and write the report.

    With `report_only`, nothing runs: the report is written from the rows already finished and
    lists the others as not run. With `only` (row names or shell patterns, e.g. "emloc-quant-0.25-s*";
    the names are those of `output/rows/*.json`), only the matching unfinished rows run.

    Returns:
        The report: {"rows": [...], "config", "versions", ...}; also written as report.json,
        report.md and quality_vs_memory.png in `output`.
    """
    from .data import default_task
    from .models import resolve_model

    cfg = config or BenchConfig()
    watch = Stopwatch()
    out = Path(output).expanduser().resolve()
    work = out / "work"
    (work / "eval").mkdir(parents=True, exist_ok=True)
    rows_dir = out / "rows"
    rows_dir.mkdir(exist_ok=True)
    if cfg.data is None:
        train_f, eval_f = (str(p) for p in default_task(cfg.task))
    else:
        train_f, eval_f = cfg.data, cfg.eval_data or cfg.data
    base = str(resolve_model(cfg.base))
    r = _Runner(work, cfg)
    jobs = _main_jobs(r, base, train_f, eval_f) + _ablation_jobs(r, base, train_f, eval_f)
    if cfg.smaller:
        small = str(resolve_model(cfg.smaller))
        jobs.append(("smaller", lambda: _row(f"LoRA on {cfg.smaller}", None, cfg.seeds[0], r.eval(
            "smaller", small, eval_f, r.train("smaller", small, train_f, eval_f, cfg.seeds[0])), train=work / "smaller")))
    jobs.sort(key=lambda job: job_priority(job[0], cfg))
    rows, skipped_rows = _run_jobs(jobs, rows_dir, report_only, only)
    report = {"base": base, "task": train_f, "eval_data": eval_f, "config": cfg, "command": command, "rows": rows,
              "metric": rows[0].get("metric", "answer NLL") if rows else "answer NLL",
              "not_run": _not_run(cfg, base, skipped_rows), "versions": versions(), "machine": machine(),
              "wall_seconds": round(watch.seconds, 1)}
    _recovered(rows)
    report["seed_spread"] = seed_spread(rows)
    write_json(out / "report.json", to_jsonable(report))
    (out / "report.md").write_text(format_report(report) + "\n")
    _plot(rows, out / "quality_vs_memory.png")
    print(watch.summary("bench", out))
    return report




def _main_jobs(r: _Runner, base: str, train_f: str, eval_f: str) -> list[tuple[str, Any]]:
    """(row name, job) of the main rows: zero-shot, LoRA, QLoRA, EMLoC per method and ratio, the
    remedies, the checkpointed LoRA, the other emulators and the clamp ablations."""
    cfg, work, first = r.cfg, r.work, r.cfg.seeds[0]
    jobs: list[tuple[str, Any]] = []
    for seed in cfg.seeds:
        jobs.append((f"zero-shot-s{seed}", lambda s=seed: _row("zero-shot original", None, s, r.eval("zero-shot", base, eval_f))))
        jobs.append((f"lora-original-s{seed}", lambda s=seed: _row(
            "LoRA on the original", None, s, r.eval(f"lora-original-s{s}", base, eval_f, r.train(f"lora-original-s{s}", base, train_f, eval_f, s)),
            train=work / f"lora-original-s{s}")))
        if cfg.qlora:
            jobs.append((f"qlora-s{seed}", lambda s=seed: qlora_rows(r, s, s == first, base, train_f, eval_f)))
        for method in cfg.methods:
            repeated = not cfg.seeded_methods or method in cfg.seeded_methods
            for ratio in cfg.ratios if seed == first else (cfg.ratios[:cfg.seeded_ratios] if repeated else ()):
                if reachable(base, method, ratio):
                    jobs += _emloc_jobs(r, method, ratio, seed, base, train_f, eval_f)
    if cfg.refine_blocks:
        k, steps = str(cfg.refine_blocks), str(max(1, cfg.steps // 2))
        for method in cfg.refine_methods or cfg.methods:
            for ratio in cfg.ratios:
                if reachable(base, method, ratio):
                    jobs.append((f"refine-{method}-{ratio}", lambda m=method, q=ratio: refine_row(r, m, q, first, base, train_f, eval_f)))
        jobs.append(("refine-control", lambda: _row(
            f"control: LoRA on the original's last {k} blocks only, {steps} steps", None, first, r.eval(
                "refine-control", base, eval_f, r.train("refine-control", base, train_f, eval_f, first, "--last-blocks", k, "--steps", steps)),
            train=work / "refine-control")))
    if cfg.checkpointing:
        jobs.append((f"lora-original-checkpointing-s{first}", lambda: _row(
            "LoRA on the original, gradient checkpointing", None, first, r.eval(
                f"lora-original-checkpointing-s{first}", base, eval_f,
                r.train(f"lora-original-checkpointing-s{first}", base, train_f, eval_f, first, "--gradient-checkpointing")),
            train=work / f"lora-original-checkpointing-s{first}")))
    for ratio in cfg.ratios[:1] if cfg.baselines else ():
        for method, label in ((m, BASELINES[m]) for m in cfg.baseline_methods):
            def baseline(q=ratio, method=method, label=label) -> dict[str, Any]:
                emu = r.build(f"{method}-{q}", base, train_f, q, cfg.samples, "--method", method)
                ad = r.train(f"adapter-{method}-{q}", str(emu), train_f, eval_f, first)
                mapped = r.correct(f"mapped-{method}-{q}", ad, None, "none")
                return _row(label, q, first, r.eval(f"{method}-{q}", base, eval_f, mapped), build=emu, train=ad, correct=mapped)
            jobs.append((f"{method}-{ratio}", baseline))
    q = cfg.ratios[0]
    for clamp in cfg.clamps:
        name = "none" if clamp is None else f"{clamp:g}"
        jobs.append((f"clamp-{name}", lambda c=clamp, n=name: _row(
            f"ablation: paper correction, clamp L={n}", q, first, r.eval(f"clamp-{n}", base, eval_f, r.correct(f"corrected-{q}-L{n}", r.train(
                f"adapter-{q}-s{first}", str(r.build(f"emulator-{q}", base, train_f, q, cfg.samples)), train_f, eval_f, first), c)),
            correct=work / f"corrected-{q}-L{n}")))

    return jobs


def _ablation_jobs(r: _Runner, base: str, train_f: str, eval_f: str) -> list[tuple[str, Any]]:
    """(row name, job) of the emulator ablations: each builds a variant, trains, corrects (weighted) and evaluates."""
    from .data import default_task

    cfg, q, first = r.cfg, r.cfg.ratios[0], r.cfg.seeds[0]

    def ablation(tag: str, label: str, samples: int, *flags: str, calibration: str | None = None, q: float = q,
                 seed: int = first):
        at = tag if seed == first else f"{tag}-s{seed}"  # the first seed keeps its names: earlier benches resume

        def go() -> list[dict[str, Any]]:
            emu = r.build(f"emulator-{q}-{tag}", base, calibration or train_f, q, samples, *flags)
            ad = r.train(f"adapter-{q}-{at}", str(emu), train_f, eval_f, seed)
            cor = r.correct(f"weighted-{q}-{at}", ad, None, "weighted")
            return [_row(f"ablation: {label}, weighted", q, seed, r.eval(f"weighted-{q}-{at}", base, eval_f, cor),
                         build=emu, train=ad, correct=cor),
                    _row(f"ablation: {label}, uncorrected", q, seed, r.eval(f"uncorrected-{q}-{at}", base, eval_f, ad),
                         build=emu, train=ad)]
        return go
    jobs: list[tuple[str, Any]] = []
    for rq in cfg.rtn_ratios:  # GPTQ's share: the same quantised emulator rounded to nearest
        jobs.append((f"rtn-{rq}", ablation("rtn", "quant rounded to nearest (no GPTQ)", cfg.samples, "--method", "quant",
                                           "--rounding", "rtn", q=rq)))
    for vf in cfg.vocab_ablations:  # what an embedding and head in `vf` cost the first quantised emulator
        jobs.append((f"vocab-{vf}", ablation(f"vocab-{vf}", f"quant with a {vf} embedding and head", cfg.samples, "--method", "quant",
                                             "--vocab-format", vf)))
    if cfg.energy_allocation:
        jobs.append(("energy-allocation", ablation("energy", "energy rank allocation", cfg.samples, "--allocation", "energy")))
    if cfg.plain_svd:
        jobs.append(("plain-svd", ablation("plain", "plain SVD", cfg.samples, "--no-whiten")))
        for pq in cfg.ratios if cfg.seeded_plain_svd else ():  # the same seeds and ratios as the main rows
            for ps in cfg.seeds if pq in cfg.ratios[:cfg.seeded_ratios] else (first,):
                if (pq, ps) != (q, first):
                    jobs.append((f"plain-svd-{pq}-s{ps}", ablation("plain", "plain SVD", cfg.samples, "--no-whiten", q=pq, seed=ps)))
    if cfg.sequential:
        jobs.append(("sequential", ablation("seq", "sequential calibration", cfg.samples, "--sequential")))
    if cfg.other_calibration and cfg.data is None and cfg.other_calibration != cfg.task:
        other = str(default_task(cfg.other_calibration)[0])
        jobs.append(("other-calibration", ablation("other", f"calibrated on {cfg.other_calibration} (off-task)", cfg.samples,
                                                   calibration=other)))
    for n in cfg.calibration_sizes:
        jobs.append((f"calib-{n}", ablation(f"calib{n}", f"{n} calibration samples", n)))
    return jobs


def _run_jobs(jobs: list[tuple[str, Any]], rows_dir: Path, report_only: bool, only: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[str]]:
    """Run the unfinished jobs (those `only` names, none with `report_only`), each row saved as it finishes.

    Returns:
        (rows, names of the rows left unfinished).
    """
    rows: list[dict[str, Any]] = []
    skipped_rows: list[str] = []
    for name, job in tqdm(jobs, desc="bench rows", unit="row"):
        f = rows_dir / f"{name}.json"
        if f.is_file():
            got = json.loads(f.read_text())
        elif report_only or (only and not any(fnmatch.fnmatchcase(name, p) for p in only)):
            skipped_rows.append(name)
            continue
        else:
            got = job()
            got = got if isinstance(got, list) else [got]
            write_json(f, got)
        rows += got
    return rows, skipped_rows


def _not_run(cfg: BenchConfig, base: str, skipped_rows: list[str]) -> dict[str, str]:
    """The report's "not run" list: {what: why}."""
    skipped = dict(NOT_RUN)
    if not cfg.qlora:
        skipped["QLoRA (NF4 base)"] = "not in this preset (see the budget presets)"
    for method in cfg.methods:
        for q in cfg.ratios:
            if not reachable(base, method, q):
                skipped[f"EMLoC {method} at {q}"] = "this method cannot build an emulator at this ratio's bytes"
    if not cfg.baselines:
        skipped["Offsite-style and pruning emulators"] = "not in this preset (see the qwen and small presets)"
    if skipped_rows:
        skipped["unfinished rows"] = ", ".join(skipped_rows) + " (not run; rerun without --report-only or --only to finish)"
    return skipped


def reachable(base: str, method: str, ratio: float) -> bool:
    """Whether `method` can build an emulator of `base` at `ratio` of its bytes (svd+quant needs room beyond NF4)."""
    from .emulator import layer_plan
    from .models import load_config

    text = load_config(Path(base))
    text = text.get_text_config() if hasattr(text, "get_text_config") else text
    # a diffusers config is a dict: its width is heads x head size
    width = text["num_attention_heads"] * text["attention_head_dim"] if isinstance(text, dict) else text.hidden_size
    try:
        layer_plan(width, width, ratio, method)
    except EmlocError:
        return False
    return True


def _emloc_jobs(r: _Runner, method: str, q: float, s: int, base: str, train_f: str, eval_f: str) -> list[tuple[str, Any]]:
    """The EMLoC rows of one emulator method, ratio and seed: each correction, uncorrected, on the emulator; auto."""
    work = r.work
    tag = "" if method == "svd" else method.replace("+", "-") + "-"  # svd keeps its names: earlier benches resume
    label = "EMLoC" if method == "svd" else f"EMLoC {method}"
    flags = () if method == "svd" else ("--method", method)

    def emulator() -> Path:
        return r.build(f"emulator-{tag}{q}", base, train_f, q, r.cfg.samples, *flags)

    def adapter() -> Path:
        return r.train(f"adapter-{tag}{q}-s{s}", str(emulator()), train_f, eval_f, s)

    def rows() -> list[dict[str, Any]]:
        emu, ad = emulator(), adapter()
        wc = r.correct(f"weighted-{tag}{q}-s{s}", ad, None, "weighted")
        cor = r.correct(f"corrected-{tag}{q}-s{s}", ad, 3.0)
        st = {"build": emu, "train": ad}
        return [_row(f"{label} (weighted correction)", q, s, r.eval(f"weighted-{tag}{q}-s{s}", base, eval_f, wc), correct=wc, **st),
                _row(f"{label} (paper correction, L=3)", q, s, r.eval(f"corrected-{tag}{q}-s{s}", base, eval_f, cor), correct=cor, **st),
                _row(f"{label} uncorrected", q, s, r.eval(f"uncorrected-{tag}{q}-s{s}", base, eval_f, ad), **st),
                _row(f"{label} adapter on the emulator", q, s, r.eval(f"on-emulator-{tag}{q}-s{s}", str(emu), eval_f, ad), **st)]

    def auto_row() -> dict[str, Any]:
        emu, ad = emulator(), adapter()
        auto = r.correct(f"auto-{tag}{q}-s{s}", ad, 3.0, "auto")
        m = read_manifest(auto) or {}
        chosen = m.get("mode", "?")
        # auto's output is one of the three candidates; reuse that candidate's evaluation when
        # its tensors are identical (they are, given the same draw), else evaluate it
        twin = {"none": (f"uncorrected-{tag}{q}-s{s}", ad), "weighted": (f"weighted-{tag}{q}-s{s}", work / f"weighted-{tag}{q}-s{s}"),
                "paper": (f"corrected-{tag}{q}-s{s}", work / f"corrected-{tag}{q}-s{s}")}.get(chosen)
        name, folder = twin if twin and _same_tensors(auto, twin[1]) else (f"auto-{tag}{q}-s{s}", auto)
        row = _row(f"{label} (auto correction, the default)", q, s, r.eval(name, base, eval_f, folder),
                   build=emu, train=ad, correct=auto)
        row.update(chosen=chosen, selection=m.get("selection"))
        return row
    return [(f"emloc-{tag}{q}-s{s}", rows)] + ([(f"auto-{tag}{q}-s{s}", auto_row)] if r.cfg.auto_correction else [])


def job_priority(name: str, cfg: BenchConfig) -> int:
    """Order of a bench job (lower runs first; ties keep their order).

    Main rows come first (the first seed, then the refinement rows, then the repeats), then
    baselines, then ablations: an
    interrupted bench has the headline comparison and its seed spread. With a smaller model the
    headline is the comparison inside the budget, so LoRA on the (bigger) original comes after it.
    """
    first = cfg.seeds[0]
    if cfg.smaller and name == f"lora-original-s{first}":
        return 1
    if name == "smaller":
        return 0
    if name.startswith(("zero-shot", "lora-original-s", "emloc-", "auto-", "qlora-")):
        return 0 if name.endswith(f"-s{first}") else 2
    if name.startswith("refine-"):  # cheap, and the remedy for the transfer gap the first seed shows
        return 1
    return 3 if name.startswith(tuple(BASELINES)) else 4


__all__ = ["BenchConfig", "PRESETS", "run_bench", "reachable", "job_priority", "format_report", "seed_spread",
           "_recovered", "_same_tensors", "machine"]
