"""Diffusers denoisers through the family table and the block-streaming engine: tiny Flux (double-
then single-stream blocks), SD3 (joint blocks) and a Stable-Diffusion UNet (down, mid and up blocks
with skip connections; DDPM noise prediction) from configs, with pixel-space image records."""

import json
import re
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

FLUX = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
SD3 = dict(sample_size=8, patch_size=2, in_channels=1, num_layers=2, attention_head_dim=8, num_attention_heads=2,
           joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=1, pos_embed_max_size=8)
# two levels (one cross-attention down block, a plain one; the mirror up), linear projections as SD 2.x
UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=4, use_linear_projection=True)
CLASSES = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel", "unet": "UNet2DConditionModel"}
PREFIX = {"flux": "transformer", "sd3": "transformer", "unet": "unet"}


def denoiser_class(kind: str):
    return getattr(diffusers, CLASSES[kind])


def make_denoiser(path: Path, kind: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = denoiser_class(kind)(**{"flux": FLUX, "sd3": SD3, "unet": UNET}[kind])
    model.save_pretrained(path)
    return path


def make_images(path: Path, n: int = 12, size: int = 8, seed: int = 0, pooled: bool = True) -> Path:
    """JSONL of grey images (a bright square somewhere) with one of two conditionings."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    (path.parent / "img").mkdir(parents=True, exist_ok=True)
    for c in range(2):
        cond = {"encoder_hidden_states": torch.randn(3, 16, generator=g), "pooled_projections": torch.randn(16, generator=g)}
        if not pooled:  # a UNet takes the text states only
            cond.pop("pooled_projections")
        save_file(cond, path.parent / f"cond{c}.safetensors")
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


@pytest.fixture(scope="module", params=["flux", "sd3", "unet"])
def denoiser(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return (request.param, make_denoiser(root / "base", request.param),
            make_images(root / "data" / "train.jsonl", pooled=request.param != "unet"))


def test_family_and_stacks(denoiser):
    from emloc.families import family_of
    from emloc.models import load_config
    from emloc.stream import StreamedModel

    kind, base, _ = denoiser
    assert family_of(load_config(base)).name == kind
    stream = StreamedModel(base)
    names = [n for n, _ in stream.stacks]
    assert names == {"flux": ["transformer_blocks", "single_transformer_blocks"], "sd3": ["transformer_blocks"],
                     "unet": ["down_blocks", "mid_block", "up_blocks"]}[kind]
    assert len(stream.blocks) == {"flux": 4, "sd3": 2, "unet": 5}[kind]
    if kind == "unet":
        assert stream.prefixes == ["down_blocks.0.", "down_blocks.1.", "mid_block.", "up_blocks.0.", "up_blocks.1."]


def _outputs(model, batches):
    with torch.no_grad():
        return [model(**b)[0] for b in batches]


def test_ratio_one_emulator_reproduces_the_denoiser(tmp_path, denoiser):
    """Covers the capture, the two-stream block outputs, (Flux) both block lists and (UNet) the glue:
    time embedding, text states and skip connections carried across down, mid and up blocks."""
    from emloc import EmulatorConfig, build_emulator, load_emulator
    from emloc.diffusion import denoiser_calibration

    kind, base, data = denoiser
    dense = build_emulator(base, data, tmp_path / "dense", EmulatorConfig(ratio=1.0, samples=6, draws=2, method="svd", device="cpu"))
    cls = denoiser_class(kind)
    orig = cls.from_pretrained(base).eval()
    batches, _ = denoiser_calibration(base, data, {"samples": 4, "draws": 1, "seed": 3})
    copy = load_emulator(dense, "cpu", "float32")
    for a, b in zip(_outputs(copy, batches), _outputs(orig, batches)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    half = build_emulator(base, data, tmp_path / "half", EmulatorConfig(ratio=0.5, samples=6, draws=2, method="svd", device="cpu"))
    man = json.loads((half / "manifest.json").read_text())
    compressed = [k for k, v in man["layers"].items() if v["rank"] is not None]
    assert man["family"] == kind and compressed
    assert all(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "down_blocks.", "mid_block.", "up_blocks."))
               for k in compressed)
    if kind == "flux":
        assert any(k.startswith("single_transformer_blocks.") for k in compressed)
    if kind == "unet":  # every transformer layer of down, mid and up blocks; never a resnet's time projection
        assert {k.split(".")[0] for k in compressed} == {"down_blocks", "mid_block", "up_blocks"}
        assert all(".attentions." in k for k in compressed) and not any("time_emb_proj" in k for k in man["layers"])
    assert all(0 <= man["layers"][k]["rel_error"] < 1 for k in compressed)
    out = _outputs(load_emulator(half, "cpu", "float32"), batches)
    assert all(torch.isfinite(o).all() for o in out)


def _batch(kind: str, seed: int = 5):
    from emloc.diffusion import model_inputs

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 16, generator=g), "pooled_projections": torch.randn(2, 16, generator=g)}
    if kind == "unet":
        cond.pop("pooled_projections")
    return model_inputs(kind, x, torch.tensor([0.3, 0.8]), cond)


def test_train_correct_and_load_with_diffusers(tmp_path, denoiser):
    """LoRA on the emulator with the flow-matching loss; the corrected adapter loads with plain PEFT and,
    as a diffusers LoRA file (r != alpha), with `load_lora_adapter`, giving the same outputs."""
    from peft import PeftModel
    from safetensors import safe_open

    from emloc import EmulatorConfig, TrainConfig, build_emulator, correct_adapter, train_adapter
    from emloc.correct import CorrectConfig

    kind, base, data = denoiser
    cls = denoiser_class(kind)
    emu = build_emulator(base, data, tmp_path / "emu", EmulatorConfig(ratio=0.5, samples=6, draws=2, method="svd", device="cpu"))
    ad = train_adapter(emu, data, tmp_path / "ad", TrainConfig(steps=4, batch_size=4, rank=4, alpha=12, lr=1e-2, device="cpu",
                                                               eval_fraction=0.2))
    man = json.loads((ad / "manifest.json").read_text())
    rows = [json.loads(line) for line in (ad / "loss_log.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["loss"] > 0 for r in rows) and man["final_eval_loss"] > 0
    keys = list(safe_open(ad / "adapter_model.safetensors", "pt").keys())
    assert keys and all(".attn" in k or ".ff" in k or "proj_" in k for k in keys)  # diffusers' usual targets only
    assert any(re.search(r"\.attn\d?\.to_q\.lora_A", k) for k in keys) and any(".ff" in k for k in keys)  # attention and MLP
    assert not any("norm1" in k for k in keys)
    for mode in ("weighted", "auto"):
        cor = correct_adapter(ad, tmp_path / mode, CorrectConfig(mode=mode, device="cpu"))
    cor = tmp_path / "weighted"
    batch = _batch(kind)
    with torch.no_grad():
        ref = cls.from_pretrained(base).eval()
        plain = ref(**batch)[0]
        via_peft = PeftModel.from_pretrained(cls.from_pretrained(base), cor).eval()(**batch)[0]
        d = cls.from_pretrained(base)
        d.load_lora_adapter(str(cor), prefix=PREFIX[kind], weight_name="pytorch_lora_weights.safetensors")
        via_diffusers = d.eval()(**batch)[0]
    assert not torch.allclose(via_peft, plain)  # the adapter does something
    torch.testing.assert_close(via_diffusers, via_peft, atol=1e-5, rtol=1e-5)


def test_paper_correction_identity_per_layer(tmp_path, denoiser):
    """Inside each LoRA's input subspace, the original + corrected LoRA equals the emulator + trained LoRA,
    for every LoRA'd layer the emulator compressed (Flux: both stacks; UNet: down, mid and up blocks)."""
    from safetensors.torch import load_file

    from emloc import EmulatorConfig, TrainConfig, build_emulator, correct_adapter, load_emulator, train_adapter
    from emloc.correct import CorrectConfig

    kind, base, data = denoiser
    emu = build_emulator(base, data, tmp_path / "emu", EmulatorConfig(ratio=0.5, samples=6, draws=2, method="svd", device="cpu"))
    ad = train_adapter(emu, data, tmp_path / "ad", TrainConfig(steps=2, batch_size=4, rank=4, alpha=12, lr=5e-2, device="cpu",
                                                               eval_fraction=0))
    cor = correct_adapter(ad, tmp_path / "cor", CorrectConfig(mode="paper", clamp=None, device="cpu"))
    s = 12 / 4
    a, c = load_file(ad / "adapter_model.safetensors"), load_file(cor / "adapter_model.safetensors")
    orig = denoiser_class(kind).from_pretrained(base).double()
    em = load_emulator(emu, "cpu", "float32").double()
    compressed = {k for k, v in json.loads((emu / "manifest.json").read_text())["layers"].items() if v["rank"] is not None}
    checked = set()
    for key in (k for k in a if k.endswith("lora_A.weight")):
        name = key[len("base_model.model."):-len(".lora_A.weight")]
        lin = em.get_submodule(name)
        if name not in compressed:
            continue
        w, w_e = orig.get_submodule(name).weight, lin.dense_weight(torch.float64)
        la, lb = a[key].double(), a[key.replace("lora_A", "lora_B")].double()
        ca, cb = c[key].double(), c[key.replace("lora_A", "lora_B")].double()
        x = torch.randn(5, la.shape[0], dtype=torch.float64) @ la
        torch.testing.assert_close(x @ (w + s * cb @ ca).T, x @ (w_e + s * lb @ la).T, atol=1e-6, rtol=1e-6)
        checked.add(name.split(".")[0])
    assert checked == {"flux": {"transformer_blocks", "single_transformer_blocks"}, "sd3": {"transformer_blocks"},
                       "unet": {"down_blocks", "mid_block", "up_blocks"}}[kind]


def test_layer_drop_shortens_every_stack_and_maps_back(tmp_path, denoiser):
    """The layer-drop baseline on a denoiser: each stack keeps round(ratio x L) blocks, the emulator equals
    the kept blocks, and its adapter lands on the original's blocks they came from. A UNet is refused."""
    from safetensors.torch import load_file

    from emloc import EmulatorConfig, TrainConfig, build_emulator, correct_adapter, load_emulator, train_adapter
    from emloc.correct import CorrectConfig
    from emloc.errors import EmlocError
    from emloc.models import block_linears
    from emloc.stream import StreamedModel

    kind, base, data = denoiser
    cfg = EmulatorConfig(ratio=0.5, samples=4, method="layer-drop", device="cpu")
    if kind == "unet":
        with pytest.raises(EmlocError, match="layer drop cannot shorten"):
            build_emulator(base, data, tmp_path / "emu", cfg)
        assert not (tmp_path / "emu").exists()
        return
    emu = build_emulator(base, data, tmp_path / "emu", cfg)
    man = json.loads((emu / "manifest.json").read_text())
    want = {"flux": {"transformer_blocks": {"0": 1}, "single_transformer_blocks": {"0": 1}},
            "sd3": {"0": 1}}[kind]  # 2 blocks per stack, ratio 0.5: the last one kept
    assert man["block_map"] == want
    per_block = [2 * sum(lin.weight.numel() for _, lin in block_linears(b)) for b in StreamedModel(base).blocks]
    kept = per_block[1] + (per_block[3] if kind == "flux" else 0)
    assert man["bytes"]["fraction"] == pytest.approx(kept / sum(per_block))
    small, orig = load_emulator(emu, "cpu", "float32"), denoiser_class(kind).from_pretrained(base)
    assert len(small.transformer_blocks) == 1 and small.config["num_layers"] == 1
    torch.testing.assert_close(small.transformer_blocks[0].state_dict(), orig.transformer_blocks[1].state_dict())
    ad = train_adapter(emu, data, tmp_path / "ad", TrainConfig(steps=1, batch_size=4, rank=4, device="cpu", eval_fraction=0))
    mapped = correct_adapter(ad, tmp_path / "mapped", CorrectConfig(mode="none", device="cpu"))
    a, b = load_file(ad / "adapter_model.safetensors"), load_file(mapped / "adapter_model.safetensors")
    assert {k.replace("blocks.0.", "blocks.1.") for k in a} == set(b)  # block 0 of each stack is the original's block 1
    for k, v in a.items():
        torch.testing.assert_close(b[k.replace("blocks.0.", "blocks.1.")], v)


def test_eval_and_merge_as_a_diffusers_folder(tmp_path, denoiser):
    from emloc import EmulatorConfig, TrainConfig, build_emulator, correct_adapter, merge_adapter, train_adapter
    from emloc.correct import CorrectConfig
    from emloc.evaluate import EvalConfig, evaluate

    kind, base, data = denoiser
    cls = denoiser_class(kind)
    emu = build_emulator(base, data, tmp_path / "emu", EmulatorConfig(ratio=0.5, samples=6, draws=2, method="svd", device="cpu"))
    ad = train_adapter(emu, data, tmp_path / "ad", TrainConfig(steps=2, batch_size=4, rank=4, lr=1e-2, device="cpu", eval_fraction=0))
    cor = correct_adapter(ad, tmp_path / "cor", CorrectConfig(mode="paper", clamp=None, device="cpu"))
    zero = evaluate(base, data, config=EvalConfig(device="cpu"))
    tuned = evaluate(base, data, cor, config=EvalConfig(device="cpu"))
    again = evaluate(base, data, cor, config=EvalConfig(device="cpu"))
    assert zero["metric"] == "denoising MSE" and zero["records"] == 12 and zero["loss"] > 0
    assert tuned["loss"] != zero["loss"] and again["loss"] == tuned["loss"]  # a fixed (noise, t) grid
    merged = merge_adapter(base, cor, tmp_path / "merged")
    assert (merged / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert evaluate(merged, data, config=EvalConfig(device="cpu"))["loss"] == pytest.approx(tuned["loss"], rel=1e-4)
    batch = _batch(kind)
    from peft import PeftModel

    with torch.no_grad():
        torch.testing.assert_close(cls.from_pretrained(merged).eval()(**batch)[0],
                                   PeftModel.from_pretrained(cls.from_pretrained(base), cor).eval()(**batch)[0], atol=1e-5, rtol=1e-5)


def test_pack_generate_and_the_task_files(tmp_path, denoiser):
    from emloc.diffusion import generate, pack, unpack

    x = torch.randn(3, 2, 6, 8)
    assert pack(x).shape == (3, 12, 8)
    torch.testing.assert_close(unpack(pack(x), 2, 6, 8), x, rtol=0, atol=0)
    kind, base, _ = denoiser
    if kind != "flux":
        return
    model = diffusers.FluxTransformer2DModel.from_pretrained(base).eval()
    cond = {"encoder_hidden_states": torch.randn(3, 16), "pooled_projections": torch.randn(16)}
    a = generate(model, "flux", cond, (1, 8, 8), 4, steps=3, seed=1)
    assert a.shape == (4, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, generate(model, "flux", cond, (1, 8, 8), 4, steps=3, seed=1), rtol=0, atol=0)


def test_fashion_task_is_written_from_the_debian_dataset(tmp_path):
    from emloc import fashion

    if not (fashion.DATA / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    train, held = fashion.write_task(tmp_path)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == 100 and all(r["conditioning"] == "class-9.safetensors" for r in rows)
    prior = [json.loads(line) for line in (tmp_path / "prior.jsonl").read_text().splitlines()]
    assert {r["conditioning"] for r in prior} == {f"class-{k}.safetensors" for k in range(9)}
    from emloc.diffusion import read_records

    recs = read_records(held, 1, None)
    assert len(recs) == 200 and recs[0].pixels.shape == (1, 28, 28) and -1 <= recs[0].pixels.min() < recs[0].pixels.max() <= 1
    torch.testing.assert_close(recs[0].conditioning["pooled_projections"], fashion.conditioning(9)["pooled_projections"])


def test_plan_refuses_a_denoiser_in_one_line(denoiser, capsys):
    from emloc.cli import main

    _, base, _ = denoiser
    assert main(["plan", "--base", str(base)]) == 2
    err = capsys.readouterr().err
    assert "not planned yet" in err and "Traceback" not in err


def test_bench_rows_on_a_denoiser(tmp_path, monkeypatch):
    """The diffusion preset's mechanics on a tiny Flux: MSE as the metric, the prior-preservation eval in
    every row, whitened against plain SVD. (Stages run in this process here, not as child processes:
    the mechanics are the same and the test stays short.)"""
    import dataclasses

    from emloc import bench
    from emloc.bench import PRESETS, run_bench
    from emloc.cli import main

    def in_process(self, *args):
        if main(["-q", *args]) != 0:
            raise AssertionError(f"stage {args[0]} failed")
    monkeypatch.setattr(bench._Runner, "cli", in_process)

    base = make_denoiser(tmp_path / "base", "flux")
    data = make_images(tmp_path / "task" / "train.jsonl", 12)
    held = make_images(tmp_path / "task" / "eval.jsonl", 6, seed=1)
    (tmp_path / "task" / "prior.jsonl").write_text(held.read_text())
    cfg = dataclasses.replace(PRESETS["diffusion"], base=str(base), data=str(data), eval_data=str(held), ratios=(0.5,), seeds=(0,),
                              steps=2, batch_size=4, samples=4, scorer=None, device="cpu")
    report = run_bench(tmp_path / "bench", cfg)
    methods = {r["method"] for r in report["rows"]}
    for m in ("zero-shot original", "LoRA on the original", "EMLoC (weighted correction)", "EMLoC uncorrected",
              "EMLoC adapter on the emulator", "ablation: plain SVD, weighted", "ablation: plain SVD, uncorrected",
              "Offsite-style emulator (layer drop)"):
        assert m in methods, m
    assert report["metric"] == "denoising MSE"
    assert all(r["nll"] > 0 and r["prior_loss"] > 0 for r in report["rows"])
    assert "held-out denoising MSE" in (tmp_path / "bench" / "report.md").read_text()
