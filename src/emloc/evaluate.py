"""Held-out evaluation: answer-token NLL / perplexity and greedy exact match on short answers."""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .artifacts import Stopwatch, check_output_file, legacy_order, peak_memory_mb, read_json_object, staged_file, to_jsonable, write_json
from .data import collate, sample
from .errors import EmlocError
from .images import collate_extras
from .families import family_of
from .models import load_config
from .objectives import AnswerNLL
from .loss import answer_nll


@dataclass
class EvalConfig:
    """Settings of `evaluate`.

    Attributes:
        samples: evaluate at most this many records (a seeded draw), or all if None.
        max_length: tokens per record.
        batch_size: records per forward pass.
        exact_match: also generate greedily and compare with the reference answer.
        em_max_answer_tokens: exact match only counts records whose answer is this short.
        seed: seed of the draw.
        device: auto, cpu, cuda.
        dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16.
        quantize: `none`, or `nf4` to evaluate a 4-bit copy of a model folder (as QLoRA trains on).
    """

    samples: int | None = None
    max_length: int = 512
    batch_size: int = 8
    exact_match: bool = True
    em_max_answer_tokens: int = 16
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"

    def __post_init__(self) -> None:
        """Settings fail here, before any file is read."""
        from .models import parse_dtype
        from .train import QUANTIZE

        for flag, value in {"--samples": self.samples or 1, "--max-length": self.max_length, "--batch-size": self.batch_size,
                            "--em-max-answer-tokens": self.em_max_answer_tokens}.items():
            if value < 1:
                raise EmlocError(f"{flag} must be at least 1 (got {value})")
        if self.quantize not in QUANTIZE:
            raise EmlocError(f"unknown --quantize {self.quantize!r}; use one of {', '.join(QUANTIZE)}")
        parse_dtype(self.dtype, torch.device("cpu"))


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD-style)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def load_for_eval(model: str | Path, adapter: str | Path | None, device: str, dtype: str, quantize: str = "none"):
    """The model (base, packaged name or emulator), with `adapter` applied through plain PEFT."""
    from peft import PeftModel

    from .train import load_model

    net = load_model(model, device, dtype, quantize)
    if adapter is not None:
        a = Path(adapter).expanduser()
        if not (a / "adapter_config.json").is_file():
            raise EmlocError(f"{a} is not a PEFT adapter folder (no adapter_config.json)")
        read_json_object(a / "adapter_config.json")
        net = PeftModel.from_pretrained(net, a)
    net.eval()
    return net


@torch.no_grad()
def evaluate(model: str | Path, data: str | Path, adapter: str | Path | None = None, output: str | Path | None = None,
             config: EvalConfig | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate a model (optionally with an adapter) on held-out JSONL data.

    (The previous order, `(model, data, adapter, config, output, overwrite)`, still works with a
    warning for one release.)

    Args:
        model: a model folder, packaged model name, or emulator folder.
        data: JSONL held-out data.
        adapter: PEFT adapter folder to apply, or None.
        config: settings; defaults to `EvalConfig()`.
        output: JSON file to write the results to (atomically), or None.
        overwrite: replace an existing `output` file.

    Returns:
        {"nll", "ppl", "answer_tokens", "records", "exact_match", "em_records", ...}.
    """
    if isinstance(output, EvalConfig) or isinstance(config, (str, Path)):  # (..., adapter, config, output, overwrite)
        legacy_order("evaluate", "evaluate(model, data, adapter, output, config, overwrite)")
        output, config = config, output  # type: ignore[assignment]
    cfg = config or EvalConfig()
    watch = Stopwatch()
    if output is not None:
        check_output_file(output, overwrite, (model, data, adapter))
    net = load_for_eval(model, adapter, cfg.device, cfg.dtype, cfg.quantize)
    device = next(net.parameters()).device
    objective = family_of(load_config(_model_dir(net))).objective_for(_model_dir(net), cfg)
    if not isinstance(objective, AnswerNLL):  # a denoiser: its held-out loss on a fixed (noise, t) draw
        result = _evaluate_objective(net, objective, data, cfg, device)
        result.update(model=str(model), adapter=str(adapter) if adapter else None, data=str(data),
                      wall_seconds=round(watch.seconds, 1), **peak_memory_mb())
        if output is not None:
            with staged_file(output, overwrite, (model, data, adapter)) as tmp:
                write_json(tmp, to_jsonable(result))
        return result
    tok, pad_id = objective.tok, objective.pad_id  # the objective has read the tokenizer and processor once
    examples = objective.load(data)
    if cfg.samples:
        examples = sample(examples, cfg.samples, cfg.seed)
    # Batches of similar length waste little on padding; the totals do not depend on the order.
    examples = sorted(examples, key=lambda e: len(e.input_ids))
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(examples), cfg.batch_size), desc="eval NLL", leave=False):
        b = {k: v.to(device) for k, v in collate(examples[i:i + cfg.batch_size], pad_id).items()}
        s, n = answer_nll(net, b)
        nll += float(s)
        count += n
    if not math.isfinite(nll):
        raise EmlocError("the evaluated model produced non-finite log-likelihoods; check the model and adapter")
    result: dict[str, Any] = {"model": str(model), "adapter": str(adapter) if adapter else None, "data": str(data),
                              "records": len(examples), "answer_tokens": count, "metric": "answer NLL", "loss": nll / max(count, 1),
                              "nll": nll / max(count, 1), "ppl": math.exp(min(nll / max(count, 1), 50))}
    if cfg.exact_match:
        short = [e for e in examples if e.answer is not None and e.prompt_len
                 and len(tok(e.answer, add_special_tokens=False)["input_ids"]) <= cfg.em_max_answer_tokens]
        hits = 0
        tok.padding_side = "left"
        for i in tqdm(range(0, len(short), cfg.batch_size), desc="eval exact match", leave=False):
            chunk = short[i:i + cfg.batch_size]
            t = max(e.prompt_len for e in chunk)  # type: ignore[type-var]
            ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, e in enumerate(chunk):
                p = e.input_ids[: e.prompt_len]
                ids[j, t - len(p):] = torch.tensor(p)
                mask[j, t - len(p):] = 1
            more = {k: v.to(device) for k, v in collate_extras([e.extras for e in chunk]).items()}  # pixel inputs
            gen = net.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                               max_new_tokens=cfg.em_max_answer_tokens + 4, pad_token_id=pad_id, **more)
            for j, e in enumerate(chunk):
                text = tok.decode(gen[j, t:], skip_special_tokens=True)
                hits += normalize(text) == normalize(e.answer or "")
        result["exact_match"] = hits / len(short) if short else None
        result["em_records"] = len(short)
    result.update(wall_seconds=round(watch.seconds, 1), **peak_memory_mb())
    if output is not None:
        with staged_file(output, overwrite, (model, data, adapter)) as tmp:
            write_json(tmp, to_jsonable(result))
    return result


def _evaluate_objective(net, objective, data: str | Path, cfg: EvalConfig, device: torch.device) -> dict[str, Any]:
    """The objective's mean held-out loss (a denoiser's MSE per pixel), each record with its fixed seed."""
    from .train import EVAL_SEED

    records = objective.load(data)
    index = list(range(len(records)))
    if cfg.samples:
        index = sample(index, cfg.samples, cfg.seed)
    total, count = 0.0, 0
    for i in tqdm(range(0, len(index), cfg.batch_size), desc=f"eval {objective.label}", leave=False):
        part = index[i:i + cfg.batch_size]
        items = [records[j] for j in part]
        total += float(objective.loss_sum(net, items, device, [EVAL_SEED + j for j in part]))
        count += objective.count(items)
    loss = total / max(count, 1)
    if not math.isfinite(loss):
        raise EmlocError("the evaluated model produced a non-finite loss; check the model and adapter")
    return {"records": len(index), "metric": objective.label, "loss": loss}


def _model_dir(net) -> Path:
    inner = net.get_base_model() if hasattr(net, "get_base_model") else net
    return Path(inner.name_or_path)
