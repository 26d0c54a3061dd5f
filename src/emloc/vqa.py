"""A real vision-language model and task to measure on, made from packaged parts.

No pretrained vision weights install here, so `smollm2-vqa-135m` is assembled the way LLaVA's first
stage does it: the real SmolLM2-135M-Instruct (the `smollm2-135m` packaged model) as the language
model, a small SigLIP-shaped vision tower (64 px images, 16 patches of 16 px, 4 layers) and a
two-layer projector, both trained from scratch with the language model frozen to caption the images
of the `easy-vqa` package ("a blue circle"). The build is seeded and cached like the packaged models
(about 10 CPU minutes on two cores); its recipe and final caption accuracy are in `emloc-source.json`.

The downstream task `easy-vqa` asks the package's questions ("is there a red shape?", "does the
image contain a circle?", "what color is the shape?"), which the captioning stage never saw: yes/no
and attribute questions. Records are TRL image records pointing at the package's PNG files.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import torch

from .errors import EmlocError

log = logging.getLogger("emloc")

VQA_MODEL = "smollm2-vqa-135m"
INSTALL = "pip install easy-vqa==1.0"
IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH = 64, 16
VISION = dict(model_type="siglip_vision_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH)
RECIPE = dict(steps=400, batch_size=16, lr=1e-3, warmup=20, seed=0, captions=3000)
CAPTION_PROMPT = "Describe the image."
# ChatML like SmolLM2's own template, with TRL content parts ({"type": "image"} -> the image token).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}" + IMAGE_TOKEN + "{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _easy_vqa():
    try:
        import easy_vqa
    except ImportError:
        raise EmlocError(f"the easy-vqa task and model need the easy-vqa package; run: {INSTALL}") from None
    return easy_vqa


def _split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, str]]:
    """(question, answer, image id) triples and image id -> PNG path of a split (`train` or `test`)."""
    ev = _easy_vqa()
    qs, answers, ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    paths = ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()
    return list(zip(qs, answers, ids)), paths


def _facts(triples: list[tuple[str, str, int]]) -> dict[int, tuple[str, str]]:
    """image id -> (colour, shape), read off the answers of the colour and shape questions."""
    color: dict[int, str] = {}
    shape: dict[int, str] = {}
    for q, a, i in triples:
        if q.startswith("what color"):
            color[i] = a
        elif q.startswith(("what shape", "what is the")):
            shape[i] = a
    return {i: (color[i], shape[i]) for i in color if i in shape}


def _record(question: str, answer: str, image: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": [image]}


def task_records(split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` seeded easy-vqa question records of a split (absolute image paths into the package)."""
    triples, paths = _split(split)
    rng = random.Random(seed)
    rng.shuffle(triples)
    return [_record(q[:1].upper() + q[1:], a, str(paths[i])) for q, a, i in triples[:n]]


def caption_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` seeded caption records ("a blue circle") of easy-vqa's training images."""
    triples, paths = _split("train")
    facts = sorted(_facts(triples).items())
    random.Random(seed).shuffle(facts)
    return [_record(CAPTION_PROMPT, f"A {c} {s}.", str(paths[i])) for i, (c, s) in facts[:n]]


def _assemble(llm_dir: Path):
    """The untrained VLM: SmolLM2's weights as its language model, a fresh vision tower and projector."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(llm_dir)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    llm.resize_token_embeddings(len(tok), mean_resizing=True)
    cfg = LlavaConfig(text_config=llm.config.to_dict(), vision_config=VISION, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full",
                      image_seq_length=(IMAGE_SIZE // PATCH) ** 2, tie_word_embeddings=llm.config.tie_word_embeddings)
    model = LlavaForConditionalGeneration(cfg)
    missing = model.model.language_model.load_state_dict(llm.model.state_dict(), strict=True)
    assert not missing.missing_keys
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    model.tie_weights()
    return model, tok


def _processor(tok):
    from transformers import LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    images = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="full",
                          num_additional_image_tokens=0, chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def build_vqa_model(target: Path, steps: int = RECIPE["steps"], seed: int = RECIPE["seed"], captions: int = RECIPE["captions"],
                    held: int = 64) -> Path:
    """Assemble and pretrain the VLM (vision tower + projector on captions, language model frozen) into `target`.

    Args:
        target: output folder (written under a temporary name, then renamed).
        steps: optimizer steps of the captioning stage (tests use a few).
        seed: seed of the weights and the data order.
        captions: caption records drawn (the first `held` are held out to score the captions).
        held: held-out caption records.
    """
    from .artifacts import staged_output
    from .data import collate, encode
    from .loss import answer_nll
    from .models import SOURCE, resolve_model

    torch.manual_seed(seed)
    model, tok = _assemble(resolve_model("smollm2-135m"))
    proc = _processor(tok)
    records = caption_records(captions, seed)
    held_out, train = records[:held], records[held:]
    examples = [encode(r, tok, 128, proc) for r in train]
    for p in model.parameters():
        p.requires_grad_(False)
    # the frozen language model runs in bfloat16 (3-4x faster on CPUs with AVX512-BF16); its float32
    # weights are put back before saving, so the saved model is SmolLM2's own weights
    llm_state = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    model.model.language_model.to(torch.bfloat16)
    trained = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=RECIPE["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / RECIPE["warmup"]) * max(0.05, 1 - s / max(steps, 1)))
    rng = random.Random(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.train()
    from tqdm.auto import tqdm

    losses = []
    for _ in tqdm(range(steps), desc=f"pretraining the {VQA_MODEL} vision tower", unit="step"):
        batch = collate(rng.sample(examples, RECIPE["batch_size"]), pad)
        nll, n = answer_nll(model, batch)
        (nll / n).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(nll.detach()) / n)
    model.eval()
    model.model.language_model.to(torch.float32).load_state_dict(llm_state)
    model.tie_weights()
    accuracy = caption_accuracy(model, tok, proc, held_out)
    with staged_output(target, overwrite=True) as tmp:
        model.config.name_or_path = VQA_MODEL
        model.save_pretrained(tmp, safe_serialization=True)
        proc.save_pretrained(tmp)
        source = {"prepared": VQA_MODEL, "install": INSTALL, "recipe": dict(RECIPE, steps=steps, seed=seed, captions=captions),
                  "vision": VISION, "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4) if losses else None,
                  "held_out_caption_accuracy": accuracy}
        (tmp / SOURCE).write_text(json.dumps(source) + "\n")
    log.info("%s: caption loss %s, held-out caption accuracy %.3f", VQA_MODEL, source["final_loss"], accuracy)
    return target


@torch.no_grad()
def caption_accuracy(model, tok, proc, records: list[dict[str, Any]]) -> float:
    """Fraction of records whose greedy caption is the reference."""
    hits = 0
    for rec in records:
        from .images import open_images

        text = proc.apply_chat_template(rec["messages"][:1], tokenize=False, add_generation_prompt=True)
        inputs = proc(text=[text], images=open_images(rec["images"], Path("/")), return_tensors="pt", add_special_tokens=False)
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8, pad_token_id=tok.eos_token_id)
        said = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        hits += said == rec["messages"][1]["content"][0]["text"]
    return hits / max(len(records), 1)


def prepared_vqa_model() -> Path:
    """The cached `smollm2-vqa-135m` folder, built on first use (one process builds, others wait)."""
    from .models import prepared_model

    return prepared_model(VQA_MODEL, RECIPE, build_vqa_model)


TASK_SIZES = {"train": 1200, "eval": 300}


def write_task(folder: Path) -> tuple[Path, Path]:
    """Write the easy-vqa train (from the package's training images) and eval (test images) JSONL files."""
    out = []
    for part, split, seed in (("train", "train", 0), ("eval", "test", 1)):
        path = folder / f"{part}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in task_records(split, TASK_SIZES[part], seed)))
        out.append(path)
    return out[0], out[1]
