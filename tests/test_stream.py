"""The block-streaming engine: batched, padded, one block at a time, and the same for every stage."""

import json

import torch

from emloc.data import calibration_ids
from emloc.models import resolve_model
from emloc.stream import (
    INPUT_GRAM,
    INPUT_SUMSQ,
    OUTPUT_GRAM,
    BlockPass,
    StreamedModel,
    batches_by_length,
)


def test_batches_by_length_respect_the_token_budget():
    lengths = [5, 40, 7, 7, 12, 100, 3]
    groups = batches_by_length(lengths, 30)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert lengths[g[0]] == longest
        assert len(g) == 1 or len(g) * longest <= 30
    assert batches_by_length(lengths, 1) == [[5], [1], [4], [2], [3], [0], [6]]  # one record per forward


def _full_model_grams(base, ids, wanted):
    """Per-record forwards of the whole model with hooks: the reference statistics."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    full = {m: 0 for m in wanted}

    def acc(m: str, x: torch.Tensor) -> None:  # a forward hook must return None
        x = x.reshape(-1, x.shape[-1]).double()
        full[m] = full[m] + x.T @ x
    hooks = [model.get_submodule(m).register_forward_hook(lambda _m, a, _o, m=m: acc(m, a[0])) for m in wanted]
    with torch.no_grad():
        for i in ids:
            model(input_ids=torch.tensor([i]))
    for h in hooks:
        h.remove()
    return model, full


def test_streamed_padded_statistics_equal_per_record_full_model_hooks(tiny_base, tiny_data):
    """Blocks read one at a time, records batched with right padding: same statistics as the whole
    model run record by record (padding excluded, block outputs handed on correctly)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    ids = calibration_ids(tiny_data, tok, samples=9, max_length=64, seed=1)
    assert len({len(i) for i in ids}) > 1  # the batches really hold padding
    wanted = {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj",
              "model.layers.1.mlp.up_proj"}
    model, full = _full_model_grams(tiny_base, ids, wanted)
    stream = StreamedModel(resolve_model(tiny_base))
    stream.load_outside(torch.device("cpu"), torch.float32)
    got = {}
    for step in stream.passes(ids, torch.device("cpu"), torch.float32, batch_tokens=64):
        mine = {m[len(step.prefix):]: (INPUT_GRAM, OUTPUT_GRAM, INPUT_SUMSQ) for m in wanted if m.startswith(step.prefix)}
        for rel, st in step.run(mine).items():
            got[step.prefix + rel] = st
    assert set(got) == wanted
    n_tokens = sum(len(i) for i in ids)
    for m in wanted:
        g = full[m]
        tol = dict(rtol=1e-5, atol=1e-5 * float(g.abs().max()))
        st = got[m]
        assert st.tokens == n_tokens
        torch.testing.assert_close(st.input_gram, g, **tol)
        torch.testing.assert_close(st.input_sumsq, g.diagonal(), **tol)
        torch.testing.assert_close(st.input_trace, torch.trace(g), **tol)
        w = model.get_submodule(m).weight.detach().double()
        wgw = w @ g @ w.T
        torch.testing.assert_close(st.output_gram, wgw, rtol=1e-5, atol=1e-5 * float(wgw.abs().max()))


def test_build_and_correct_see_the_same_statistics(tiny_base, tiny_data, tmp_path, monkeypatch):
    """`emloc build` and `emloc correct --mode weighted` stream the same records through one engine: the
    same layers see the same tokens and activations (equal token counts and traces, bit for bit), and
    correct's projected statistics equal E G A^T and A G A^T of the original's input Grams."""
    from safetensors.torch import load_file

    from emloc import CorrectConfig, EmulatorConfig, TrainConfig, build_emulator, correct_adapter, train_adapter
    from emloc.correct import ProjectedStatistics

    seen: dict[str, dict] = {"build": {}, "correct": {}}
    projected: dict[str, ProjectedStatistics] = {}
    phase = {"now": "build"}
    real_run = BlockPass.run

    def spy(self, requests):
        stats = real_run(self, requests)
        seen[phase["now"]].update({self.prefix + rel: st for rel, st in stats.items()})
        for rel, kinds in requests.items():
            projected.update({self.prefix + rel: k for k in kinds if isinstance(k, ProjectedStatistics)})
        return stats
    monkeypatch.setattr(BlockPass, "run", spy)
    emu = build_emulator(tiny_base, tiny_data, tmp_path / "emu", EmulatorConfig(ratio=0.5, samples=12, device="cpu", batch_tokens=48, method="svd"))
    ad = train_adapter(emu, tiny_data, tmp_path / "ad", TrainConfig(steps=1, batch_size=2, rank=2, device="cpu"))
    phase["now"] = "correct"
    correct_adapter(ad, tmp_path / "fixed", config=CorrectConfig(mode="weighted", device="cpu"))
    built, corrected = seen["build"], seen["correct"]
    layers = json.loads((emu / "manifest.json").read_text())["layers"]
    assert set(corrected) == {k for k, v in layers.items() if v["rank"] is not None} == set(built) == set(projected)
    for name in built:
        assert corrected[name].tokens == built[name].tokens
        assert torch.equal(corrected[name].input_trace, built[name].input_trace)
    # the input Grams of the same records, through the same engine
    from transformers import AutoTokenizer

    ids = calibration_ids(tiny_data, AutoTokenizer.from_pretrained(tiny_base), 12, 512, 0)
    stream = StreamedModel(resolve_model(tiny_base))
    stream.load_outside(torch.device("cpu"), torch.float32)
    grams = {}
    for step in stream.passes(ids, torch.device("cpu"), torch.float32, batch_tokens=48):
        rels = [n[len(step.prefix):] for n in built if n.startswith(step.prefix)]
        grams.update({step.prefix + r: st.input_gram for r, st in step.run({r: (INPUT_GRAM,) for r in rels}).items()})
    adapter = load_file(ad / "adapter_model.safetensors")
    emu_store = StreamedModel(emu).store
    for name, st in projected.items():
        g = grams[name]
        a = adapter[f"base_model.model.{name}.lora_A.weight"].double()
        e = stream.store.get(name + ".weight").double() - emu_store.get(name + ".up").double() @ emu_store.get(name + ".down").double()
        torch.testing.assert_close(st.agat, a @ g @ a.T, rtol=1e-6, atol=1e-9)
        # E x = W x - W_e x: the fp32 forward's rounding of W x (1e-7 relative) is amplified by the cancellation
        torch.testing.assert_close(st.egat, e @ g @ a.T, rtol=1e-4, atol=1e-5 * float((e @ g @ a.T).abs().max()))
