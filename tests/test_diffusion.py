"""Diffusers denoisers through the family table and the block-streaming engine: tiny Flux (double-
then single-stream blocks) and SD3 (joint blocks) from configs, with pixel-space image records."""

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
SD3 = dict(sample_size=8, patch_size=2, in_channels=1, num_layers=2, attention_head_dim=8, num_attention_heads=2,
           joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=1, pos_embed_max_size=8)


def make_denoiser(path: Path, kind: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(**FLUX) if kind == "flux" else diffusers.SD3Transformer2DModel(**SD3)
    model.save_pretrained(path)
    return path


def make_images(path: Path, n: int = 12, size: int = 8, seed: int = 0) -> Path:
    """JSONL of grey images (a bright square somewhere) with one of two conditionings."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    (path.parent / "img").mkdir(parents=True, exist_ok=True)
    for c in range(2):
        save_file({"encoder_hidden_states": torch.randn(3, 16, generator=g), "pooled_projections": torch.randn(16, generator=g)},
                  path.parent / f"cond{c}.safetensors")
    rows = []
    rng = np.random.default_rng(seed)
    for i in range(n):
        px = np.zeros((size, size), dtype="uint8")
        r, c = rng.integers(0, size - 3, 2)
        px[r:r + 3, c:c + 3] = 255
        Image.fromarray(px).save(path.parent / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "conditioning": f"cond{i % 2}.safetensors"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", params=["flux", "sd3"])
def denoiser(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, make_denoiser(root / "base", request.param), make_images(root / "data" / "train.jsonl")


def test_family_and_stacks(denoiser):
    from emloc.families import family_of
    from emloc.models import load_config
    from emloc.stream import StreamedModel

    kind, base, _ = denoiser
    assert family_of(load_config(base)).name == kind
    stream = StreamedModel(base)
    names = [n for n, _ in stream.stacks]
    assert names == (["transformer_blocks", "single_transformer_blocks"] if kind == "flux" else ["transformer_blocks"])
    assert len(stream.blocks) == (4 if kind == "flux" else 2)


def _outputs(model, batches):
    with torch.no_grad():
        return [model(**b)[0] for b in batches]


def test_ratio_one_emulator_reproduces_the_denoiser(tmp_path, denoiser):
    """Covers the capture, the two-stream block outputs and (Flux) both block lists."""
    from emloc import EmulatorConfig, build_emulator, load_emulator
    from emloc.diffusion import denoiser_calibration

    kind, base, data = denoiser
    dense = build_emulator(base, data, tmp_path / "dense", EmulatorConfig(ratio=1.0, samples=6, draws=2, method="svd", device="cpu"))
    cls = diffusers.FluxTransformer2DModel if kind == "flux" else diffusers.SD3Transformer2DModel
    orig = cls.from_pretrained(base).eval()
    batches, _ = denoiser_calibration(base, data, {"samples": 4, "draws": 1, "seed": 3})
    copy = load_emulator(dense, "cpu", "float32")
    for a, b in zip(_outputs(copy, batches), _outputs(orig, batches)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    half = build_emulator(base, data, tmp_path / "half", EmulatorConfig(ratio=0.5, samples=6, draws=2, method="svd", device="cpu"))
    man = json.loads((half / "manifest.json").read_text())
    compressed = [k for k, v in man["layers"].items() if v["rank"] is not None]
    assert man["family"] == kind and compressed
    assert all(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in compressed)
    if kind == "flux":
        assert any(k.startswith("single_transformer_blocks.") for k in compressed)
    assert all(0 <= man["layers"][k]["rel_error"] < 1 for k in compressed)
    out = _outputs(load_emulator(half, "cpu", "float32"), batches)
    assert all(torch.isfinite(o).all() for o in out)
