"""Denoisers (diffusers): image records, the noising, and the model inputs of calibration and training.

Data: JSONL, one image per record, `{"image": "img/0.png", "conditioning": "cond/dog.safetensors"}`
(paths relative to the JSONL file). The conditioning file holds the denoiser's conditioning inputs
by argument name, for one sample: `encoder_hidden_states` (T x D) and, for Flux and SD3,
`pooled_projections` (P), as a pipeline's `encode_prompt` gives them (compute them once with the
text encoders; emloc never loads those). Images are read as pixels in [-1, 1] at the denoiser's input
size (pixel-space denoisers; a latent denoiser takes the VAE's latents the same way, as a
safetensors `"latents"` file in place of the image).

Objective, as each kind of denoiser is trained (`DENOISERS`): rectified flow for Flux and SD3,
x_t = (1 - t) x_0 + t e, the model predicts e - x_0 (t from a logit-normal, as SD3's training); DDPM
for a UNet (Stable Diffusion 1.x/2.x), x_t = sqrt(a_k) x_0 + sqrt(1 - a_k) e with the scaled-linear
schedule of 1000 steps, the model predicts e (k uniform). The loss is the mean squared error. Each
record gets `draws` seeded (e, t) pairs, the same for a given seed in `emloc build` and `emloc correct`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import EmlocError


@dataclass(frozen=True)
class Denoiser:
    """How a kind of denoiser takes its inputs and what it predicts.

    Attributes:
        sample_arg: the forward argument of the noised images (`hidden_states`, or a UNet's `sample`).
        packed: Flux: images enter as 2 x 2 patch tokens, with position ids.
        time_scale: the `timestep` argument is t (in [0, 1)) times this.
        schedule: `flow` (rectified flow, predicts noise - x0) or `ddpm` (predicts the noise; integer steps).
    """

    sample_arg: str = "hidden_states"
    packed: bool = False
    time_scale: float = 1000.0
    schedule: str = "flow"


DENOISERS = {"flux": Denoiser(packed=True, time_scale=1.0), "sd3": Denoiser(),
             "unet": Denoiser(sample_arg="sample", schedule="ddpm")}
DDPM_STEPS = 1000


def _alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule (betas 0.00085..0.012 over 1000 steps), cumulative."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, DDPM_STEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


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


def sample_t(n: int, gen: torch.Generator, schedule: str = "flow") -> torch.Tensor:
    """Timesteps in [0, 1): from a logit-normal (mean 0, std 1) as SD3 trains, or uniform DDPM steps / 1000."""
    if schedule == "ddpm":
        return torch.randint(0, DDPM_STEPS, (n,), generator=gen).float() / DDPM_STEPS
    return torch.sigmoid(torch.randn(n, generator=gen))


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: str = "flow") -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target): rectified flow x_t = (1 - t) x0 + t noise, target noise - x0; or DDPM at step
    k = 1000 t, x_t = sqrt(a_k) x0 + sqrt(1 - a_k) noise, target noise."""
    shape = (-1, *([1] * (x0.dim() - 1)))
    if schedule == "ddpm":
        a = _alphas_cumprod()[(t * DDPM_STEPS).round().long().clamp(0, DDPM_STEPS - 1)].view(shape)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, noise
    tt = t.view(shape)
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
    d = DENOISERS[family]
    if d.packed:
        b, _, h, w = xt.shape
        n_txt = cond["encoder_hidden_states"].shape[1]
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        return {"hidden_states": pack(xt), "timestep": t, "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(n_txt, 3),
                "return_dict": False, **cond}
    return {d.sample_arg: xt, "timestep": t * d.time_scale, "return_dict": False, **cond}


def prediction(family: str, out: Any, like: torch.Tensor) -> torch.Tensor:
    """The denoiser's output as B x C x H x W."""
    y = out[0] if isinstance(out, (tuple, list)) else out.sample
    return unpack(y, *like.shape[1:]) if DENOISERS[family].packed else y


def calibration_batches(records: list[ImageRecord], family: str, draws: int, seed: int,
                        batch_size: int = 16) -> list[dict[str, Any]]:
    """`draws` seeded (noise, t) pairs per record, as batches of model inputs (the same for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    schedule = DENOISERS[family].schedule
    items = []
    for rec in records:
        for _ in range(draws):
            noise = torch.randn(rec.pixels.shape, generator=gen)
            items.append((rec, noise, sample_t(1, gen, schedule)))
    out = []
    for i in range(0, len(items), batch_size):
        part = items[i:i + batch_size]
        x0 = torch.stack([r.pixels for r, _, _ in part])
        t = torch.cat([t for _, _, t in part])
        xt, _ = noised(x0, torch.stack([n for _, n, _ in part]), t, schedule)
        cond = {k: torch.stack([r.conditioning[k] for r, _, _ in part]) for k in part[0][0].conditioning}
        out.append(model_inputs(family, xt, t, cond))
    return out


def image_shape(config: Any) -> tuple[int, int | None]:
    """(channels, size) of a denoiser's input images: Flux packs 2 x 2 patches into its channels and
    takes any size; SD3 and a UNet take `sample_size`."""
    from .families import family_of

    if DENOISERS[family_of(config).name].packed:
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
    family = family_of(config).name
    batches = calibration_batches(records, family, int(settings.get("draws", 4)), int(settings.get("seed", 0)))
    d = DENOISERS[family]
    # image positions the blocks see: Flux's packed tokens; SD3's 2 x 2 patches; a UNet's first-level pixels
    tokens = sum(x.shape[0] * (x.shape[1] if x.dim() == 3 else x.shape[-1] * x.shape[-2] // (1 if d.sample_arg == "sample" else 4))
                 for x in (b[d.sample_arg] for b in batches))
    return batches, tokens


def flow_loss(model: Any, family: str, items: list[ImageRecord], device: torch.device, seeds: list[int]) -> torch.Tensor:
    """Summed denoising MSE of `items` (velocity, or a UNet's noise), each record's (noise, t) drawn from its own seed."""
    schedule = DENOISERS[family].schedule
    noise, ts = [], []
    for rec, seed in zip(items, seeds):  # each record's draw depends on its seed only: any batching gives it
        gen = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(rec.pixels.shape, generator=gen))
        ts.append(sample_t(1, gen, schedule))
    x0 = torch.stack([r.pixels for r in items])
    t = torch.cat(ts)
    xt, target = noised(x0, torch.stack(noise), t, schedule)
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
    pure noise (t = 1) to the data (t = 0) (rectified-flow denoisers)."""
    if DENOISERS[family].schedule != "flow":
        raise EmlocError(f"sampling is implemented for rectified-flow denoisers (Flux, SD3), not {family}; "
                         "use a diffusers pipeline with the adapter")
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
