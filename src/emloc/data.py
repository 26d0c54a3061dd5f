"""Downstream data: JSONL in TRL's conventions, tokenised with answer-only labels.

Accepted records (one JSON object per line, the format is detected from the first record):
- `{"prompt": str, "completion": str}`: plain text, loss on the completion (EOS appended);
- `{"prompt": [messages], "completion": [messages]}`: chat template, loss on the completion;
- `{"messages": [{"role", "content"}, ...]}`: chat template, loss on assistant turns;
- `{"text": str}`: loss on every token;
- any of the message forms with `"images": [path, ...]` and `{"type": "image"}` content parts, for
  vision-language models (see `emloc.images`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import EmlocError
from .images import collate_extras, encode_image_record, is_image_record

IGNORE = -100
FORMATS = ("prompt_completion", "messages", "text")
log = logging.getLogger("emloc")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a JSONL data file of text (or image-text) records.

    Raises:
        EmlocError: missing, empty, not JSONL, or records without the expected fields.
    """
    records = read_jsonl_objects(path)
    fmt = detect_format(records[0], f"{path} line 1")
    for i, rec in enumerate(records, 1):
        if detect_format(rec, f"{path} record {i}") != fmt:
            raise EmlocError(f"{path} record {i} has a different format from record 1; use one format per file")
    return records


def read_jsonl_objects(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (at least one), with one-line errors for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EmlocError(f"data file {path} does not exist; give a JSONL file (one JSON object per line)")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is tolerated
    except UnicodeDecodeError as exc:
        raise EmlocError(f"{path} is not UTF-8 text (byte {exc.start}); save the data as UTF-8 JSONL") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise EmlocError(f"{path} line {i} is not valid JSON; the data must be JSONL (one JSON object per line)") from None
        if not isinstance(rec, dict):
            raise EmlocError(f"{path} line {i} is not a JSON object; each line must be an object like {{\"prompt\": ..., \"completion\": ...}}")
        records.append(rec)
    if not records:
        raise EmlocError(f"data file {path} is empty; it needs at least one JSON record")
    return records


def detect_format(rec: dict[str, Any], where: str = "record") -> str:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise EmlocError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        if not any(m["role"] == "assistant" for m in msgs):
            raise EmlocError(f"{where}: 'messages' has no assistant turn to learn from")
        return "messages"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise EmlocError(f"{where}: 'text' must be a string")
        return "text"
    raise EmlocError(f"{where} has fields {sorted(rec)}; expected 'prompt'+'completion', 'messages' or 'text'")


@dataclass
class Example:
    """One tokenised example.

    Attributes:
        input_ids: (T,) token ids.
        labels: (T,) targets, IGNORE where no loss is taken.
        prompt_len: tokens before the last answer (for generation), or None if there is no answer.
        answer: text of the last answer, or None.
        extras: the model's other inputs for this record (an image record's `pixel_values`...), or None.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_len: int | None
    answer: str | None
    extras: dict[str, torch.Tensor] | None = None


def content_text(content: Any) -> str:
    """A message's text: a string, or TRL's list of content parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise EmlocError(f"a message content part of type {kind!r} is not text; this model takes text messages only")
            parts.append(part["text"])
        return "".join(parts)
    return str(content)


def _chat(tok, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    if getattr(tok, "chat_template", None) is None:
        raise EmlocError("the data uses chat messages but the model's tokenizer has no chat template; use prompt/completion strings instead")
    msgs = [{"role": m["role"], "content": content_text(m["content"])} for m in messages]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)


def _prefix_of(prefix: str, full: str) -> str:
    """`prefix`, checked to be how `full` starts: answer spans are located by rendering growing prefixes."""
    if not full.startswith(prefix):
        raise EmlocError("the chat template renders earlier turns differently once later turns follow (it rewrites the "
                         "conversation), so the answer tokens cannot be located; give prompt/completion strings instead")
    return prefix


def _spans(rec: dict[str, Any], fmt: str, tok) -> tuple[str, list[tuple[int, int]]]:
    """Full text and the character spans that carry loss."""
    if fmt == "text":
        return rec["text"], [(0, len(rec["text"]))]
    if fmt == "prompt_completion":
        p, c = rec["prompt"], rec["completion"]
        if isinstance(p, str) and isinstance(c, str):
            eos = tok.eos_token or ""
            return p + c + eos, [(len(p), len(p) + len(c) + len(eos))]
        if isinstance(p, list) and isinstance(c, list):
            full = _chat(tok, p + c, False)
            prefix = _prefix_of(_chat(tok, p, True), full)
            return full, [(len(prefix), len(full))]
        raise EmlocError("'prompt' and 'completion' must both be strings or both be lists of messages")
    msgs = rec["messages"]
    full = _chat(tok, msgs, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(_prefix_of(_chat(tok, msgs[:i], True), full)) if i else 0
        end = len(_prefix_of(_chat(tok, msgs[: i + 1], False), full))
        spans.append((start, end))
    return full, spans


def encode(rec: dict[str, Any], tok, max_length: int, processor=None, root: Path = Path(".")) -> Example:
    """Tokenise one record, with labels only on the answer spans (an image record with `processor`,
    its image paths relative to `root`).

    Chat templates are rendered prefix by prefix to find where each assistant turn starts and ends
    in characters; the token offsets of a fast tokenizer then mark which tokens carry loss. This
    works for any template that renders a conversation as a growing prefix.
    """
    fmt = detect_format(rec)
    if is_image_record(rec):
        return encode_image_record(rec, processor, max_length, root)
    text, spans = _spans(rec, fmt, tok)
    enc = tok(text, add_special_tokens=fmt == "text" or fmt == "prompt_completion" and isinstance(rec["prompt"], str),
              return_offsets_mapping=True, truncation=True, max_length=max_length)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for j, (a, b) in enumerate(offsets):
        if b > a and any(s <= a < e for s, e in spans):
            labels[j] = ids[j]
    prompt_len = answer = None
    if fmt != "text":
        last = spans[-1][0]
        prompt_len = next((j for j, (a, b) in enumerate(offsets) if b > a and a >= last), len(ids))
        if fmt == "messages":
            answer = content_text(rec["messages"][-1]["content"]) if rec["messages"][-1]["role"] == "assistant" else None
        else:
            c = rec["completion"]
            answer = c if isinstance(c, str) else content_text(c[-1]["content"])
    return Example(ids, labels, prompt_len, answer)


def load_examples(path: str | Path, tok, max_length: int, processor=None) -> list[Example]:
    """Read a JSONL file and tokenise every record; skips (and reports) records left with no answer token to predict.

    A label at position 0 is never predicted (nothing precedes it), so it does not count. Image
    records need the model's `processor` (`models.load_processor`).
    """
    root = Path(path).expanduser().parent
    out = [encode(r, tok, max_length, processor, root) for r in read_jsonl(path)]
    kept = [e for e in out if any(t != IGNORE for t in e.labels[1:])]
    if not kept:
        raise EmlocError(f"no record in {path} has answer tokens within --max-length {max_length}; raise --max-length")
    if len(kept) < len(out):
        log.warning("%d of %d records in %s have no answer token within --max-length %d and are skipped; raise --max-length "
                    "to keep them", len(out) - len(kept), len(out), path, max_length)
    return kept


def sample(items: list, n: int, seed: int) -> list:
    """A seeded random subset of n items (all of them, shuffled, if there are fewer)."""
    rng = random.Random(seed)
    idx = list(range(len(items)))
    rng.shuffle(idx)
    return [items[i] for i in idx[:n]]


def calibration_records(path: str | Path, tok, samples: int, max_length: int, seed: int,
                        calibration_tokens: int | None = None, processor=None) -> list[Example]:
    """The calibration records: a seeded draw of `samples` records of `path`.

    With `calibration_tokens`, records past `samples` are added (in the same order) until the
    calibration holds at least that many tokens. `emloc build` and `emloc correct` call this with
    the same arguments, so they see the same records.
    """
    examples = sample(load_examples(path, tok, max_length, processor), 10**9, seed)
    chosen = examples[:samples]
    if calibration_tokens:
        for e in examples[samples:]:
            if sum(len(c.input_ids) for c in chosen) >= calibration_tokens:
                break
            chosen.append(e)
    return chosen


def text_calibration(base_dir: Path, path: Path, settings: dict[str, Any]) -> tuple[list[Example], int]:
    """The calibration records of a language (or vision-language) model and their token count, from
    the emulator settings (`samples`, `max_length`, `seed`, `calibration_tokens`)."""
    from .models import load_processor, load_tokenizer

    samples = int(settings.get("samples", 64))
    tok = load_tokenizer(base_dir)
    n = len(read_jsonl(path))
    if n < samples:
        log.warning("calibration: %d records asked for but %s holds only %d; using all of them", samples, path, n)
    records = calibration_records(path, tok, samples, int(settings.get("max_length", 512)), int(settings.get("seed", 0)),
                                  settings.get("calibration_tokens"), load_processor(base_dir))
    return records, sum(len(e.input_ids) for e in records)


def calibration_ids(path: str | Path, tok, samples: int, max_length: int, seed: int,
                    calibration_tokens: int | None = None) -> list[list[int]]:
    """The token ids of `calibration_records` (text records)."""
    return [e.input_ids for e in calibration_records(path, tok, samples, max_length, seed, calibration_tokens)]


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch into input_ids, attention_mask and labels tensors (B x T), plus the records'
    other model inputs (`pixel_values`...) joined by `images.collate_extras`."""
    t = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), t), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, **collate_extras([e.extras for e in batch])}


# ---------------------------------------------------------------------------------------------
# Embedded tasks from the English chatterbot corpus (pip install chatterbot-corpus), fixed splits.

DEFAULT_TASK = "chatterbot-en"
TASKS = {
    "chatterbot-en": "answer in the style of the corpus (2-4 turn Q/A conversations on trivia, science, "
                     "history...): long answers, scored by held-out answer NLL",
    "chatterbot-topic": "name the corpus topic (one of 21 words, e.g. history, science, food) a question "
                        "comes from: short answers, scored by answer NLL and exact match",
    "fashion-new-class": "teach a denoiser such as fashion-flux-tiny a class it never saw (Fashion-MNIST ankle boots, "
                         "100 images): image records, scored by denoising MSE and generated-sample accuracy",
    "easy-vqa": "answer questions about 64 px shape images (yes/no, colour, shape; the easy-vqa package) with a "
                "vision-language model such as smollm2-vqa-135m: image records, scored by answer NLL and exact match",
}
# Tasks whose records reference image files, written by their own modules (`write_task(folder)`).
TASK_WRITERS = {"easy-vqa": "emloc.vqa:write_task", "fashion-new-class": "emloc.fashion:write_task"}
TOPIC_PROMPT = "Which of these topics is the question from? {topics}\nQuestion: {question}\nAnswer with the topic only."


def _conversations() -> list[tuple[str, list[str]]]:
    """(topic, turns) for every English conversation whose first turn is new (case-insensitive)."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise EmlocError("the embedded tasks need the chatterbot corpus; run: pip install --no-deps chatterbot-corpus==1.3.3")
    src = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    out, seen = [], set()
    for yml in sorted(src.glob("*.yml")):
        for conv in yaml.safe_load(yml.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in conv if str(t).strip()]
            if len(turns) < 2 or turns[0].lower() in seen:
                continue
            seen.add(turns[0].lower())
            out.append((yml.stem, turns))
    return out


def _records(task: str, convs: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    if task == "chatterbot-en":
        rows = []
        for _, turns in convs:
            turns = turns[: len(turns) // 2 * 2]
            rows.append({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]})
        return rows
    topics = ", ".join(sorted({t for t, _ in convs}))
    return [{"messages": [{"role": "user", "content": TOPIC_PROMPT.format(topics=topics, question=turns[0])},
                          {"role": "assistant", "content": topic}]} for topic, turns in convs]


def default_task(name: str = DEFAULT_TASK) -> tuple[Path, Path]:
    """Write (once) and return the train / eval JSONL files of an embedded task (see `TASKS`).

    Conversations are split by a hash of their first line (15% held out), so the held-out set is
    fixed, the same for every task and disjoint from training and calibration whatever the seed.
    """
    from .models import cache_dir

    if name not in TASKS:
        raise EmlocError(f"unknown task {name!r}; use one of {', '.join(TASKS)} or give --data FILE")
    folder = cache_dir() / "data" / name
    train, held = folder / "train.jsonl", folder / "eval.jsonl"
    if train.is_file() and held.is_file():
        return train, held
    if name in TASK_WRITERS:  # image tasks: files written by their module, the folder renamed when complete
        import importlib
        import shutil

        module, fn = TASK_WRITERS[name].split(":")
        tmp = folder.with_name(f".{name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        getattr(importlib.import_module(module), fn)(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return train, held
    convs = _conversations()
    split = {"train": [], "eval": []}
    for conv, rec in zip(convs, _records(name, convs)):
        h = int(hashlib.sha256(conv[1][0].lower().encode()).hexdigest(), 16) % 100
        split["eval" if h < 15 else "train"].append(rec)
    folder.mkdir(parents=True, exist_ok=True)
    for part, path in (("train", train), ("eval", held)):
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in split[part]))
        tmp.rename(path)
    return train, held
