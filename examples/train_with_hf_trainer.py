"""Train the emulator with your own trainer (here: Hugging Face `Trainer`), then correct with emloc.

    emloc build --base smollm2-135m --calibration train.jsonl --output emulator
    python examples/train_with_hf_trainer.py --emulator emulator --data train.jsonl --output my-adapter
    emloc correct --adapter my-adapter --output corrected

The emulator is an ordinary transformers model; its compressed layers are nn.Linear subclasses, so
`peft.get_peft_model` puts LoRA on them with the shapes the original layers would have. The adapter
only needs to be saved with `save_pretrained`: `emloc correct` finds the emulator through
`base_model_name_or_path` in adapter_config.json (or pass --emulator).
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, Trainer, TrainingArguments

import emloc
from emloc.data import collate, load_examples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--emulator", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--correct-to", help="also write the corrected adapter here")
    args = ap.parse_args()

    model = emloc.load_emulator(args.emulator, device="cpu" if not torch.cuda.is_available() else "cuda")
    tok = AutoTokenizer.from_pretrained(args.emulator)
    examples = load_examples(args.data, tok, max_length=256)  # or tokenise your own way
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=args.output + ".trainer", max_steps=args.steps, per_device_train_batch_size=4,
                               learning_rate=3e-4, lr_scheduler_type="cosine", logging_steps=10, save_strategy="no",
                               report_to=[], remove_unused_columns=False, use_cpu=not torch.cuda.is_available()),
        train_dataset=examples,
        data_collator=lambda batch: collate(batch, pad),
    )
    trainer.train()
    model.save_pretrained(args.output)
    if args.correct_to:
        emloc.correct_adapter(args.output, args.correct_to, emulator=args.emulator)


if __name__ == "__main__":
    main()
