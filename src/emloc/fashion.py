"""A real denoiser and a DreamBooth-like task to measure on, made from packaged data.

No pretrained diffusion weights install here, so `fashion-flux-tiny` is a small Flux-shaped denoiser
(`FluxTransformer2DModel`: 1 double-stream and 3 single-stream blocks, width 96, 28 x 28 pixel
space packed into 196 tokens) pretrained here with rectified flow on Fashion-MNIST classes 0-8
(Debian `dataset-fashion-mnist`), class-conditional: each class is a fixed, seeded "prompt
embedding" (`encoder_hidden_states` 2 x 64 and `pooled_projections` 64), as a text encoder would
give. The build is seeded and cached (about 10 CPU minutes on two cores); its recipe and losses are in
`emloc-source.json`.

The task `fashion-new-class` is DreamBooth-like: class 9 (ankle boot), never seen in pretraining,
from 100 training images under its own new embedding. Metrics: held-out denoising MSE on class-9 test
images (a fixed noise/timestep grid), the accuracy of a small Fashion-MNIST classifier (trained once,
cached) on samples generated for the new class, and prior preservation: the same on classes 0-8.

    python -m emloc.fashion score --model DIR [--adapter DIR] --output scores.json
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import EmlocError

log = logging.getLogger("emloc")

DATA = Path("/usr/share/datasets/fashion-mnist")
INSTALL = "apt install dataset-fashion-mnist (Debian)"
MODEL = "fashion-flux-tiny"
NEW_CLASS = 9
DENOISER = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=3, attention_head_dim=32, num_attention_heads=3,
                joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(8, 12, 12))
RECIPE = dict(steps=1000, batch_size=32, lr=1e-3, warmup=50, seed=0)
TASK_SIZES = {"train": 100, "eval": 200, "prior": 270}


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images N x 28 x 28 uint8, labels N) of the `train` or `t10k` split."""
    import numpy as np

    files = [DATA / f"{split}-images-idx3-ubyte.gz", DATA / f"{split}-labels-idx1-ubyte.gz"]
    if not all(f.is_file() for f in files):
        raise EmlocError(f"Fashion-MNIST is not installed ({files[0]} missing); run: {INSTALL}")
    with gzip.open(files[0]) as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(files[1]) as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype("int64"))


def conditioning(label: int) -> dict[str, torch.Tensor]:
    """The fixed "prompt embedding" of a class (seeded by the class, unit scale)."""
    g = torch.Generator().manual_seed(1000 + label)
    return {"encoder_hidden_states": torch.randn(2, 64, generator=g), "pooled_projections": torch.randn(64, generator=g)}


def _records(images: torch.Tensor, labels: torch.Tensor):
    from .diffusion import ImageRecord

    conds = {k: conditioning(k) for k in range(10)}
    return [ImageRecord(img[None].float() / 127.5 - 1, conds[int(y)]) for img, y in zip(images, labels)]


def build_denoiser(target: Path, steps: int = RECIPE["steps"], seed: int = RECIPE["seed"]) -> Path:
    """Pretrain the class-conditional denoiser on classes 0-8 into `target` (written under a temporary name)."""
    import random

    from diffusers import FluxTransformer2DModel
    from tqdm.auto import tqdm

    from .artifacts import staged_output
    from .diffusion import flow_loss
    from .models import SOURCE

    images, labels = load_split("train")
    keep = labels != NEW_CLASS
    records = _records(images[keep], labels[keep])
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**DENOISER)
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / RECIPE["warmup"]) * max(0.05, 1 - s / max(steps, 1)))
    rng = random.Random(seed)
    losses = []
    model.train()
    for step in tqdm(range(steps), desc=f"pretraining {MODEL}", unit="step"):
        idx = rng.sample(range(len(records)), RECIPE["batch_size"])
        items = [records[i] for i in idx]
        loss = flow_loss(model, "flux", items, torch.device("cpu"), [seed * 10**7 + step * 1000 + j for j in range(len(idx))])
        (loss / sum(r.pixels.numel() for r in items)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()) / sum(r.pixels.numel() for r in items))
    model.eval()
    with staged_output(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        source = {"prepared": MODEL, "install": INSTALL, "recipe": dict(RECIPE, steps=steps, seed=seed), "denoiser": DENOISER,
                  "classes": "0-8 (class 9 held out)", "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 5)}
        (tmp / SOURCE).write_text(json.dumps(source) + "\n")
    return target


def prepared_denoiser() -> Path:
    """The cached `fashion-flux-tiny` folder, built on first use (one process builds, others wait)."""
    from .models import prepared_model

    return prepared_model(MODEL, RECIPE, build_denoiser)


def write_task(folder: Path) -> tuple[Path, Path]:
    """Write the task: `train.jsonl` (100 class-9 training images), `eval.jsonl` (200 class-9 test
    images) and `prior.jsonl` (30 test images of each class 0-8), PNGs and conditioning files beside them."""
    from PIL import Image
    from safetensors.torch import save_file

    (folder / "img").mkdir(parents=True, exist_ok=True)
    for k in range(10):
        save_file(conditioning(k), folder / f"class-{k}.safetensors")
    g = torch.Generator().manual_seed(0)
    out = []
    for part, split in (("train", "train"), ("eval", "t10k"), ("prior", "t10k")):
        images, labels = load_split(split)
        if part == "prior":
            idx = torch.cat([torch.nonzero(labels == k).flatten()[:30] for k in range(NEW_CLASS)])
        else:
            pool = torch.nonzero(labels == NEW_CLASS).flatten()
            idx = pool[torch.randperm(len(pool), generator=g)[:TASK_SIZES[part]]]
        rows = []
        for i in idx.tolist():
            name = f"img/{split}-{i}.png"
            Image.fromarray(images[i].numpy()).save(folder / name)
            rows.append({"image": name, "conditioning": f"class-{int(labels[i])}.safetensors"})
        path = folder / f"{part}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out.append(path)
    return out[0], out[1]


class Classifier(nn.Module):
    """A small CNN for 28 x 28 Fashion-MNIST (pixels in [-1, 1])."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 49, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def classifier() -> Classifier:
    """The cached classifier (2 epochs on the training split; its test accuracy is in its metadata file)."""
    from .models import cache_dir

    path = cache_dir() / "models" / "fashion-classifier.pt"
    net = Classifier()
    if path.is_file():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    images, labels = load_split("train")
    x = images[:, None].float() / 127.5 - 1
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(2):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            b = perm[i:i + 128]
            loss = nn.functional.cross_entropy(net(x[b]), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    ti, tl = load_split("t10k")
    with torch.no_grad():
        acc = float((net(ti[:, None].float() / 127.5 - 1).argmax(1) == tl).float().mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.rename(path)
    path.with_suffix(".json").write_text(json.dumps({"test_accuracy": acc, "epochs": 2}) + "\n")
    return net


@torch.no_grad()
def score(model: str | Path, adapter: str | Path | None = None, n: int = 64, seed: int = 0,
          grid: Path | None = None) -> dict[str, Any]:
    """Classifier accuracy on `n` samples generated for the new class, and per old class (prior preservation)."""
    from .diffusion import generate
    from .evaluate import load_for_eval

    net = load_for_eval(model, adapter, "cpu", "float32")
    clf = classifier()
    new = generate(net, "flux", conditioning(NEW_CLASS), (1, 28, 28), n, seed=seed)
    prior_n = max(1, n // NEW_CLASS)
    old = [generate(net, "flux", conditioning(k), (1, 28, 28), prior_n, seed=seed + 1 + k) for k in range(NEW_CLASS)]
    result = {"new_class_accuracy": float((clf(new).argmax(1) == NEW_CLASS).float().mean()),
              "prior_accuracy": float(sum(int((clf(x).argmax(1) == k).sum()) for k, x in enumerate(old)) / (prior_n * NEW_CLASS)),
              "samples": n}
    if grid is not None:
        save_grid(torch.cat([new[:10], *[x[:1] for x in old]]), grid)
    return result


def save_grid(images: torch.Tensor, path: Path, per_row: int = 10) -> None:
    """A PNG of images (N x 1 x 28 x 28 in [-1, 1]), `per_row` a row."""
    from PIL import Image

    n = len(images)
    rows = (n + per_row - 1) // per_row
    canvas = torch.zeros(rows * 28, per_row * 28)
    for i, img in enumerate(images):
        r, c = divmod(i, per_row)
        canvas[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] = img[0]
    Image.fromarray(((canvas + 1) * 127.5).clamp(0, 255).byte().numpy()).save(path)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m emloc.fashion", description="score a denoiser on the fashion-new-class task")
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("score", help="classifier accuracy of generated samples (new class, prior classes)")
    s.add_argument("--model", required=True)
    s.add_argument("--adapter")
    s.add_argument("--samples", type=int, default=64)
    s.add_argument("--grid", help="PNG of samples to write")
    s.add_argument("--output", required=True)
    ns = p.parse_args(argv)
    try:
        out = score(ns.model, ns.adapter, ns.samples, grid=Path(ns.grid) if ns.grid else None)
    except EmlocError as exc:
        print(f"emloc: error: {exc}", file=sys.stderr)
        return 2
    tmp = Path(ns.output + ".tmp")
    tmp.write_text(json.dumps(out) + "\n")
    tmp.rename(ns.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
