"""Denoisers (diffusers): image records, the noising, and the model inputs of calibration and training.

Data: JSONL, one image per record, `{"image": "img/0.png", "conditioning": "cond/dog.safetensors"}`
(paths relative to the JSONL file). The conditioning file holds the denoiser's conditioning inputs
by argument name, for one sample: `encoder_hidden_states` (T x D) and, for Flux and SD3,
`pooled_projections` (P), as a pipeline's `encode_prompt` gives them (compute them once with the
text encoders; emloc never loads those). Images are read as pixels in [-1, 1] at the denoiser's input
size (pixel-space denoisers; a latent denoiser takes the VAE's latents the same way, as a
safetensors `"latents"` file in place of the image).

Objective: rectified flow, as Flux and SD3 are trained: x_t = (1 - t) x_0 + t e, the model predicts
e - x_0, the loss is the mean squared error. Each record gets `draws` seeded (e, t) pairs (t from a
logit-normal, as SD3's training), the same for a given seed in `emloc build` and `emloc correct`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import EmlocError


@dataclass
class ImageRecord:
    """One training image and its conditioning.

    Attributes:
        pixels: C x H x W in [-1, 1] (or latents).
        conditioning: argument name -> tensor of one sample (no batch axis).
    """

    pixels: torch.Tensor
    conditioning: dict[str, torch.Tensor]


def read_image(path: Path, channels: int, size: int | None) -> torch.Tensor:
    """An image file as C x H x W floats in [-1, 1]; a `.safetensors` file is read as its `latents`."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)["latents"].float()
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            img = img.resize((size, size)) if size else img
            import numpy as np

            x = torch.from_numpy(np.asarray(img, dtype="float32").copy())
    except (UnidentifiedImageError, OSError) as exc:
        raise EmlocError(f"image {path} cannot be read ({exc}); give PNG/JPEG files") from None
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    return x / 127.5 - 1


def read_records(path: str | Path, channels: int, size: int | None) -> list[ImageRecord]:
    """Read a JSONL file of image records (see the module doc)."""
    from safetensors.torch import load_file

    from .data import read_jsonl_objects

    path = Path(path).expanduser()
    out = []
    cache: dict[Path, dict[str, torch.Tensor]] = {}
    for i, rec in enumerate(read_jsonl_objects(path), 1):
        if not isinstance(rec.get("image"), str) or not isinstance(rec.get("conditioning"), str):
            raise EmlocError(f"{path} record {i} needs \"image\" and \"conditioning\" paths (a denoiser's data)")
        image, cond = path.parent / rec["image"], path.parent / rec["conditioning"]
        for f in (image, cond):
            if not f.is_file():
                raise EmlocError(f"{f} (record {i} of {path}) does not exist; paths are relative to the JSONL file")
        if cond not in cache:
            cache[cond] = {k: v.float() for k, v in load_file(cond).items()}
        out.append(ImageRecord(read_image(image, channels, size), cache[cond]))
    return out


def sample_t(n: int, gen: torch.Generator) -> torch.Tensor:
    """Timesteps in (0, 1) from a logit-normal (mean 0, std 1), as SD3 trains."""
    return torch.sigmoid(torch.randn(n, generator=gen))


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) of rectified flow: x_t = (1 - t) x0 + t noise, target = noise - x0."""
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tt) * x0 + tt * noise, noise - x0


def pack(x: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> B x (H/2 * W/2) x 4C: Flux's 2 x 2 patch tokens."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def model_inputs(family: str, xt: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The denoiser's forward arguments for a batch of noised images (B x C x H x W) at times t (B)."""
    if family == "flux":
        b, _, h, w = xt.shape
        n_txt = cond["encoder_hidden_states"].shape[1]
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        return {"hidden_states": pack(xt), "timestep": t, "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(n_txt, 3),
                "return_dict": False, **cond}
    return {"hidden_states": xt, "timestep": t * 1000, "return_dict": False, **cond}  # SD3: timesteps in [0, 1000]


def prediction(family: str, out: Any, like: torch.Tensor) -> torch.Tensor:
    """The denoiser's output as B x C x H x W."""
    y = out[0] if isinstance(out, (tuple, list)) else out.sample
    return unpack(y, *like.shape[1:]) if family == "flux" else y


def calibration_batches(records: list[ImageRecord], family: str, draws: int, seed: int,
                        batch_size: int = 16) -> list[dict[str, Any]]:
    """`draws` seeded (noise, t) pairs per record, as batches of model inputs (the same for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for rec in records:
        for _ in range(draws):
            noise = torch.randn(rec.pixels.shape, generator=gen)
            items.append((rec, noise, sample_t(1, gen)))
    out = []
    for i in range(0, len(items), batch_size):
        part = items[i:i + batch_size]
        x0 = torch.stack([r.pixels for r, _, _ in part])
        t = torch.cat([t for _, _, t in part])
        xt, _ = noised(x0, torch.stack([n for _, n, _ in part]), t)
        cond = {k: torch.stack([r.conditioning[k] for r, _, _ in part]) for k in part[0][0].conditioning}
        out.append(model_inputs(family, xt, t, cond))
    return out


def image_shape(config: Any) -> tuple[int, int | None]:
    """(channels, size) of a denoiser's input images: Flux packs 2 x 2 patches into its channels and
    takes any size; SD3 takes `sample_size`."""
    if config.get("_class_name") == "FluxTransformer2DModel":
        return config["in_channels"] // 4, None
    return config["in_channels"], config.get("sample_size")


def denoiser_calibration(base_dir: Path, path: Path, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """A denoiser's calibration: `samples` seeded records of `path`, `draws` seeded (noise, t) pairs
    each, as batches of model inputs; and the image tokens they hold."""
    from .data import sample
    from .families import family_of
    from .models import load_config

    config = load_config(base_dir)
    channels, size = image_shape(config)
    records = sample(read_records(path, channels, size), int(settings.get("samples", 64)), int(settings.get("seed", 0)))
    batches = calibration_batches(records, family_of(config).name, int(settings.get("draws", 4)), int(settings.get("seed", 0)))
    tokens = sum(b["hidden_states"].shape[0] * (b["hidden_states"].shape[1] if b["hidden_states"].dim() == 3 else
                 b["hidden_states"].shape[-1] * b["hidden_states"].shape[-2] // 4) for b in batches)
    return batches, tokens


def flow_loss(model: Any, family: str, items: list[ImageRecord], device: torch.device, seeds: list[int]) -> torch.Tensor:
    """Summed velocity MSE of `items`, each record's (noise, t) drawn from its own seed."""
    noise, ts = [], []
    for rec, seed in zip(items, seeds):  # each record's draw depends on its seed only: any batching gives it
        gen = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(rec.pixels.shape, generator=gen))
        ts.append(sample_t(1, gen))
    x0 = torch.stack([r.pixels for r in items])
    t = torch.cat(ts)
    xt, target = noised(x0, torch.stack(noise), t)
    cond = {k: torch.stack([r.conditioning[k] for r in items]) for k in items[0].conditioning}
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    inputs = {k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in model_inputs(family, xt, t, cond).items()}
    pred = prediction(family, model(**inputs), x0).float()
    return (pred - target.to(device)).square().sum()


@torch.no_grad()
def generate(model: Any, family: str, cond: dict[str, torch.Tensor], shape: tuple[int, ...], n: int, steps: int = 20,
             seed: int = 0) -> torch.Tensor:
    """`n` samples (n x C x H x W, in [-1, 1]) for one conditioning, by Euler steps of the flow from
    pure noise (t = 1) to the data (t = 0)."""
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
    c = {k: v.expand(n, *v.shape).contiguous() for k, v in cond.items()}
    ts = torch.linspace(1, 0, steps + 1)
    for a, b in zip(ts[:-1], ts[1:]):
        inputs = {k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in model_inputs(family, x, torch.full((n,), float(a)), c).items()}
        v = prediction(family, model(**inputs), x).float().cpu()
        x = x + (b - a) * v
    return x.clamp(-1, 1)
