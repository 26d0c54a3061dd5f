"""Image records for vision-language models, in TRL's conventions.

A record is `{"messages": [...], "images": [path, ...]}` (or `prompt`/`completion` message lists with
`images`), where message contents are lists of parts and each `{"type": "image"}` part stands for the
next image of `images` (paths relative to the JSONL file). The model folder's processor renders the
conversation with its chat template, expands each image into its image tokens and computes the pixel
inputs (`pixel_values`, and whatever else the model takes: `image_sizes`, `image_grid_thw`...).

Answer tokens are located by token prefixes: each assistant turn starts where the rendering of the
conversation up to it (with the generation prompt) stops agreeing with the full rendering, and ends
where the rendering through it does. Image tokens are expanded identically in a prefix and in the
whole, so this holds for any processor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import EmlocError

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def is_image_record(rec: dict[str, Any]) -> bool:
    """Whether a record carries images (an `images` field or an image content part)."""
    if rec.get("images"):
        return True
    msgs = [*(rec.get("messages") or []), *_as_list(rec.get("prompt")), *_as_list(rec.get("completion"))]
    return any(_image_parts(m) for m in msgs if isinstance(m, dict))


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _image_parts(message: dict[str, Any]) -> int:
    content = message.get("content")
    return sum(isinstance(p, dict) and p.get("type") == "image" for p in content) if isinstance(content, list) else 0


def _conversation(rec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
    """The record as one message list, and the indices of the turns that carry loss."""
    if "messages" in rec:
        msgs = rec["messages"]
        return msgs, [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    p, c = rec.get("prompt"), rec.get("completion")
    if not (isinstance(p, list) and isinstance(c, list)):
        raise EmlocError("an image record needs 'messages', or 'prompt' and 'completion' as lists of messages")
    return p + c, list(range(len(p), len(p) + len(c)))


def open_images(paths: Any, root: Path) -> list:
    """The record's images as RGB PIL images; paths are relative to `root` (the JSONL file's folder)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise EmlocError("'images' must be a list of image file paths (relative to the JSONL file)")
    out = []
    for p in paths:
        path = (root / p).expanduser()
        if not path.is_file():
            raise EmlocError(f"image {path} does not exist; image paths are relative to the JSONL file's folder")
        try:
            with Image.open(path) as img:
                out.append(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise EmlocError(f"image {path} cannot be read ({exc}); give PNG/JPEG files") from None
    return out


def image_token_id(processor) -> int | None:
    """The id of the token that stands for image patches, where the processor says."""
    tid = getattr(processor, "image_token_id", None)
    if tid is None and getattr(processor, "image_token", None) is not None:
        tid = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return tid


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_image_record(rec: dict[str, Any], processor, max_length: int, root: Path):
    """Tokenise an image record with the model's processor; labels on the assistant turns.

    Returns:
        an `Example` whose `extras` holds the processor's pixel inputs (e.g. `pixel_values`,
        images x 3 x H x W for Llava). A record whose image tokens do not fit in `max_length` comes
        back without answer tokens (and is then skipped and reported).
    """
    from .data import IGNORE, Example, content_text

    if processor is None:
        raise EmlocError("the data has image records but the model has no processor (it is a text-only model); "
                         "use a vision-language model folder or text-only data")
    msgs, turns = _conversation(rec)
    images = open_images(rec.get("images", []), root)
    parts = sum(_image_parts(m) for m in msgs)
    if parts != len(images):
        raise EmlocError(f"a record has {parts} image parts in its messages but {len(images)} files in 'images'; "
                         "give one {\"type\": \"image\"} part per image")
    if getattr(processor, "chat_template", None) is None:
        raise EmlocError("the model's processor has no chat template, so image conversations cannot be rendered")

    def render(upto: int, generation_prompt: bool) -> tuple[list[int], dict[str, torch.Tensor]]:
        part = msgs[:upto]
        text = processor.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)
        k = sum(_image_parts(m) for m in part)
        out = processor(text=[text], images=images[:k] or None, return_tensors="pt", add_special_tokens=False)
        return out["input_ids"][0].tolist(), {key: v for key, v in out.items() if key not in TEXT_INPUTS}

    ids, extras = render(len(msgs), False)
    labels = [IGNORE] * len(ids)
    start = len(ids)
    for i in turns:
        start = _common_prefix(render(i, True)[0], ids) if i else 0
        end = _common_prefix(render(i + 1, False)[0], ids)
        labels[start:end] = ids[start:end]
    last = msgs[-1]
    answer = content_text(last["content"]) if last["role"] == "assistant" else None
    if len(ids) > max_length:
        tid = image_token_id(processor)
        if tid is None or tid in ids[max_length:]:  # cutting image tokens would break the model's input
            return Example(ids[:max_length], [IGNORE] * max_length, None, None, extras)
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels, min(start, len(ids)), answer, extras)


def collate_extras(extras: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor]:
    """Join the records' pixel inputs: per-image tensors are concatenated along their first axis
    (the processors' convention: images, or image patches, first)."""
    present = [e for e in extras if e]
    if not present:
        return {}
    out = {}
    for key in present[0]:
        parts = [e[key] for e in present if key in e]
        try:
            out[key] = torch.cat(parts)
        except RuntimeError:
            raise EmlocError(f"the records' {key} have different shapes {[tuple(p.shape) for p in parts]} and cannot "
                             "be batched; use --batch-size 1 (or images of one size)") from None
    return out
