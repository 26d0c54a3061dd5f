"""Shared fixtures: tiny random models built from a config, a word-level tokenizer, tiny data."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

WORDS = ("what is the color of sky sea grass sun snow fire blue green red yellow white orange answer question "
         "a an it i you we they name capital city france paris rome italy berlin germany one two three four five "
         "six seven eight nine ten plus minus equals yes no hello hi how are good fine thanks big small cat dog").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Tiny configs of several families; all have nn.Linear block layers.
TINY = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4),
    "phi3": dict(model_type="phi3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
    "gemma": dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8),
}
OTHER = {"gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4)}  # Conv1D blocks: not compressible


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + ["system", "user", "assistant", "?", ".", ","] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model_dir(path: Path, family: str = "llama", seed: int = 0, layers: int | None = None) -> Path:
    """Save a tiny random model of `family` (optionally with `layers` blocks) with the word tokenizer into `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tokenizer()
    kw = dict(TINY.get(family) or OTHER[family])
    model_type = kw.pop("model_type")
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), max_position_embeddings=128,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def make_data(path: Path, n: int = 40, fmt: str = "messages", seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + " ?"
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) + " ."
        if fmt == "messages":
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        elif fmt == "prompt_completion":
            rows.append({"prompt": q + " ", "completion": a})
        else:
            rows.append({"text": q + " " + a})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("base") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "train.jsonl", 40)


@pytest.fixture(scope="session")
def tiny_emulator(tmp_path_factory, tiny_base, tiny_data) -> Path:
    from emloc import EmulatorConfig, build_emulator

    return build_emulator(tiny_base, tiny_data, tmp_path_factory.mktemp("emu") / "emulator",
                          EmulatorConfig(ratio=0.5, samples=32, device="cpu", method="svd"))


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_emulator, tiny_data) -> Path:
    from emloc import TrainConfig, train_adapter

    return train_adapter(tiny_emulator, tiny_data, tmp_path_factory.mktemp("ad") / "adapter",
                         TrainConfig(steps=4, batch_size=4, micro_batch_size=2, lr=5e-2, rank=4, alpha=16,
                                     eval_every=2, device="cpu"))
