"""Model families as data: what each stage needs to know about a kind of model, in one table.

A `Family` says how to build a model of that kind (its transformers Auto class), which stack of
blocks holds the layers to compress (a fixed path, or the generic search: the `nn.ModuleList` of
identical modules holding the most parameters), the PEFT task type of its LoRA, and the config
attributes under which its logits are post-processed after the output head (where the loss's
hidden-state shortcut would be wrong). Stages ask `family_of(config)` and never test model types;
a new kind of model is a new entry, and a model type whose blocks the generic search would get
wrong is one line in `BY_MODEL_TYPE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import EmlocError

# Config attributes of families that post-process logits after the head (soft-capping, scaling).
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class Family:
    """Facts about one kind of model.

    Attributes:
        name: short name, recorded in manifests.
        auto_class: the transformers Auto class that builds and loads it.
        task_type: PEFT task type of its LoRA.
        blocks: dotted paths of the block stacks to compress, walked in this order (a Flux
            denoiser's double-stream then single-stream blocks), or None for the generic search.
        block_outputs: names of the entries of the tuple a block returns, when the next block takes
            more than the hidden states (`("encoder_hidden_states", "hidden_states")` for Flux and SD3
            blocks); None: the first entry (or the only output) is the next block's hidden states.
        search_in: where the generic search looks: `model` (everywhere) or `decoder` (inside
            `model.get_decoder()`: a vision-language model's language model, whose blocks the vision
            tower may outweigh).
        logit_postprocessing: config attributes that, when set to anything but 1, post-process the
            logits after the head (the loss then computes full logits).
    """

    name: str
    auto_class: str
    task_type: str
    blocks: tuple[str, ...] | None = None
    block_outputs: tuple[str, ...] | None = None
    search_in: str = "model"
    logit_postprocessing: tuple[str, ...] = LOGIT_POSTPROCESSING

    def auto(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)

    def skeleton(self, config) -> nn.Module:
        """The model with parameters on the meta device (no memory, no init); buffers are real."""
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            try:
                model = self.auto().from_config(config)
            except ValueError as exc:
                raise EmlocError(f"{config.model_type!r} is not a model that transformers can build as "
                                 f"{self.auto_class}: {exc}") from None
        model.tie_weights()  # tied parameters then appear once in named_parameters() and are read once
        return model

    def load(self, folder, **kwargs: Any) -> nn.Module:
        return self.auto().from_pretrained(folder, **kwargs)

    def find_stacks(self, model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
        """(dotted name, module list) of every block stack to compress, in the order they run."""
        if self.blocks is not None:
            return [(b, model.get_submodule(b)) for b in self.blocks]  # type: ignore[misc]
        return [self.find_blocks(model)]

    def find_blocks(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """(dotted name, module list) of the (first) block stack to compress."""
        if self.blocks is not None:
            return self.blocks[0], model.get_submodule(self.blocks[0])  # type: ignore[return-value]
        if self.search_in == "decoder":
            decoder = model.get_decoder()
            path = next(n for n, m in model.named_modules() if m is decoder)
            name, blocks = _largest_block_stack(decoder)
            return f"{path}.{name}", blocks
        return _largest_block_stack(model)

    def vision_blocks(self, model: nn.Module) -> tuple[str, nn.ModuleList] | None:
        """(dotted name, module list) of the vision tower's blocks, the largest stack outside the
        language model; None for a family without one. Compressed only where a ratio table asks."""
        if self.search_in != "decoder":
            return None
        decoder = model.get_decoder()
        path = next(n for n, m in model.named_modules() if m is decoder)
        try:
            return _largest_block_stack(model, exclude=path)
        except EmlocError:
            return None

    def post_processes_logits(self, config) -> bool:
        return any(getattr(config, a, None) not in (None, 1, 1.0) for a in self.logit_postprocessing)


def _largest_block_stack(model: nn.Module, exclude: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of identical modules (with nn.Linear layers) holding the most parameters
    (outside the submodule `exclude`, if given)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
            continue
        if exclude is not None and (name == exclude or name.startswith(exclude + ".")):
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise EmlocError("found no transformer blocks built of nn.Linear layers in this model (e.g. GPT-2 uses Conv1D); "
                         "emloc compresses nn.Linear layers only, so use a model whose blocks have them")
    return best[1], best[2]


CAUSAL_LM = Family("causal-lm", "AutoModelForCausalLM", "CAUSAL_LM")
# Llava, Qwen2-VL, Idefics3/SmolVLM, Gemma3, InternVL...: a vision tower, a projector and a language
# model; only the language model's blocks are compressed and LoRA'd by default.
IMAGE_TEXT = Family("image-text-to-text", "AutoModelForImageTextToText", "CAUSAL_LM", search_in="decoder")

# Model types whose facts differ from their kind's defaults (e.g. blocks the generic search would
# miss because another stack is larger); empty while every supported type is found generically.
BY_MODEL_TYPE: dict[str, Family] = {}


def family_of(config) -> Family:
    """The family of a model config: an entry for its `model_type`, else its kind (a config with a
    vision and a text part is a vision-language model), else a causal LM."""
    entry = BY_MODEL_TYPE.get(getattr(config, "model_type", None) or "")
    if entry is not None:
        return entry
    if getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None:
        return IMAGE_TEXT
    return CAUSAL_LM
