"""Model families as data: what each stage needs to know about a kind of model, in one table.

A `Family` says how to build a model of that kind (its transformers or diffusers class), which
stacks of blocks hold the layers to compress (fixed paths, or the generic search: the
`nn.ModuleList` of identical modules holding the most parameters) and what a block hands the next,
how to draw the calibration inputs, the training objective, the PEFT task type and default targets
of its LoRA, and the config attributes under which its logits are post-processed after the output
head (where the loss's hidden-state shortcut would be wrong). Stages ask `family_of(config)` and never test model types;
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
        library: the module that holds `auto_class` (`transformers` or `diffusers`).
        lora_prefix: key prefix of the diffusers LoRA file `emloc correct` also writes (`transformer`),
            or None for no such file.
        default_targets: module names (relative to a block) that LoRA targets by default, or None for
            every nn.Linear of the blocks.
        calibration: "module:function" giving the calibration inputs from the emulator settings.
        objective: "module:class" of the training objective (see `emloc.objectives`).
        weights_stem: file stem of the library's weight shards (`model`, `diffusion_pytorch_model`).
        plannable: whether `emloc plan` has formulas for this kind of model.
        glue: "module:Class" whose instance builds each block's inputs from the previous block's
            output when blocks of different kinds hand each other more than one tensor (a UNet's
            down, mid and up blocks and their skip connections); None: `block_outputs` says it.
        compress: regex (searched in a layer's name) of the block linears an emulator compresses by
            default; None: every block linear.
        stack_lengths: the config attribute holding each stack's number of blocks (of the text
            config, for a vision-language model), which a layer-drop emulator rewrites; empty: the
            stacks cannot be shortened (a UNet's blocks differ in shape).
    """

    name: str
    auto_class: str
    task_type: str | None
    blocks: tuple[str, ...] | None = None
    block_outputs: tuple[str, ...] | None = None
    search_in: str = "model"
    logit_postprocessing: tuple[str, ...] = LOGIT_POSTPROCESSING
    library: str = "transformers"
    calibration: str = "emloc.data:text_calibration"
    objective: str = "emloc.objectives:AnswerNLL"
    weights_stem: str = "model"
    plannable: bool = True
    lora_prefix: str | None = None
    default_targets: tuple[str, ...] | None = None
    glue: str | None = None
    compress: str | None = None
    stack_lengths: tuple[str, ...] = ("num_hidden_layers",)

    def calibrate(self, base_dir, path, settings: dict[str, Any]) -> tuple[list, int]:
        """The calibration inputs the block-streaming engine runs (records, or ready batches of model
        inputs) and their token count, from the emulator settings `settings` (samples, seed...)."""
        import importlib

        module, fn = self.calibration.split(":")
        return getattr(importlib.import_module(module), fn)(base_dir, path, settings)

    def objective_for(self, model_dir, cfg: Any) -> Any:
        """The training objective of this kind of model (see `emloc.objectives`), for `model_dir`."""
        import importlib

        module, cls = self.objective.split(":")
        return getattr(importlib.import_module(module), cls)(model_dir, cfg)

    def make_glue(self) -> Any:
        """A fresh instance of the family's glue (see `glue`), or None."""
        import importlib

        if self.glue is None:
            return None
        module, cls = self.glue.split(":")
        return getattr(importlib.import_module(module), cls)()

    def auto(self) -> Any:
        import importlib

        return getattr(importlib.import_module(self.library), self.auto_class)

    def skeleton(self, config) -> nn.Module:
        """The model with parameters on the meta device (no memory, no init); buffers are real."""
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            try:
                model = self.auto().from_config(config)
            except ValueError as exc:
                kind = getattr(config, "model_type", None) or self.auto_class
                raise EmlocError(f"{kind!r} is not a model that {self.library} can build as {self.auto_class}: {exc}") from None
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # tied parameters then appear once in named_parameters() and are read once
        return model

    def load(self, folder, **kwargs: Any) -> nn.Module:
        return self.auto().from_pretrained(folder, **kwargs)

    def find_stacks(self, model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
        """(dotted name, module list) of every block stack to compress, in the order they run."""
        if self.blocks is not None:  # a path may name one module that is a block (a UNet's mid block)
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

# Diffusers denoisers (PeftAdapterMixin): their blocks return (encoder_hidden_states, hidden_states),
# both of which the next block takes; Flux runs its double-stream blocks, then its single-stream ones.
# LoRA targets as diffusers' DreamBooth scripts write them; the diffusers LoRA file's key prefix.
DIFFUSION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
_DENOISER = dict(task_type=None, library="diffusers", calibration="emloc.diffusion:denoiser_calibration",
                 objective="emloc.objectives:FlowMatching", weights_stem="diffusion_pytorch_model",
                 plannable=False, block_outputs=("encoder_hidden_states", "hidden_states"),
                 lora_prefix="transformer", default_targets=DIFFUSION_TARGETS, logit_postprocessing=())
FLUX = Family("flux", "FluxTransformer2DModel", blocks=("transformer_blocks", "single_transformer_blocks"), **_DENOISER,
              stack_lengths=("num_layers", "num_single_layers"))
SD3 = Family("sd3", "SD3Transformer2DModel", blocks=("transformer_blocks",), **_DENOISER, stack_lengths=("num_layers",))
# Stable Diffusion's UNet: down blocks, the mid block, up blocks, streamed one at a time; the glue
# (emloc.unet) carries the time embedding, the text states and the skip connections between them.
# Only the transformer layers' linears are compressed (a resnet's time-embedding projection sees one
# vector per image, not per position); the UNet predicts the noise (DDPM, emloc.diffusion).
UNET = Family("unet", "UNet2DConditionModel", blocks=("down_blocks", "mid_block", "up_blocks"),
              **{**_DENOISER, "block_outputs": None, "lora_prefix": "unet"}, glue="emloc.unet:UNetGlue",
              compress=r"\.(attentions|transformer_blocks)\.", stack_lengths=())
BY_DIFFUSERS_CLASS: dict[str, Family] = {f.auto_class: f for f in (FLUX, SD3, UNET)}


def diffusers_class(name: str) -> Any:
    """The diffusers model class of a diffusers config's `_class_name`, if emloc has a family for it."""
    if name not in BY_DIFFUSERS_CLASS:
        raise EmlocError(f"diffusers model {name!r} is not supported; emloc streams {', '.join(BY_DIFFUSERS_CLASS)}")
    try:
        return BY_DIFFUSERS_CLASS[name].auto()
    except ImportError:
        raise EmlocError("this is a diffusers model; install diffusers: pip install 'emloc[diffusion]'") from None


# Model types whose facts differ from their kind's defaults (e.g. blocks the generic search would
# miss because another stack is larger); empty while every supported type is found generically.
BY_MODEL_TYPE: dict[str, Family] = {}


def family_of(config) -> Family:
    """The family of a model config: an entry for its `model_type`, else its kind (a config with a
    vision and a text part is a vision-language model), else a causal LM."""
    if isinstance(config, dict) and "_class_name" in config:  # a diffusers config
        return BY_DIFFUSERS_CLASS.get(config["_class_name"]) or diffusers_class(config["_class_name"])
    entry = BY_MODEL_TYPE.get(getattr(config, "model_type", None) or "")
    if entry is not None:
        return entry
    if getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None:
        return IMAGE_TEXT
    return CAUSAL_LM
