"""Nothing lost, nothing silently wrong: outputs never touch inputs, broken inputs and settings give one-line errors."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emloc.cli import main

from .conftest import make_data, make_tokenizer


def digest(path: Path) -> str:
    """Every file's bytes under `path` (or the file itself), so 'untouched' can be asserted exactly."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def fails(args, capsys, match):
    """Run the CLI; assert exit 2 with exactly one `emloc: error:` line containing `match` and no traceback."""
    code = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("emloc: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def emu(tmp_path, tiny_emulator):
    return Path(shutil.copytree(tiny_emulator, tmp_path / "emu"))


@pytest.fixture
def adapter(tmp_path, tiny_adapter):
    return Path(shutil.copytree(tiny_adapter, tmp_path / "runs" / "adapter"))


# 1. --overwrite never deletes an input


def test_train_output_equal_to_the_model_is_refused(emu, tiny_data, capsys):
    before = digest(emu)
    fails(["train", "--model", str(emu), "--data", str(tiny_data), "--output", str(emu), "--overwrite", "--steps", "1",
           "--device", "cpu"], capsys, "is the input")
    assert digest(emu) == before


def test_train_output_equal_to_the_data_is_refused(tmp_path, emu, capsys):
    data = make_data(tmp_path / "d.jsonl", 20)
    before = digest(data)
    fails(["train", "--model", str(emu), "--data", str(data), "--output", str(data), "--overwrite", "--steps", "1"], capsys, "is the input")
    assert digest(data) == before


def test_correct_output_containing_the_adapter_is_refused(adapter, emu, capsys):
    runs = adapter.parent
    before = digest(runs)
    fails(["correct", "--adapter", str(adapter), "--emulator", str(emu), "--output", str(runs), "--overwrite"], capsys, "contains the input")
    assert digest(runs) == before


def test_merge_output_inside_the_adapter_is_refused(adapter, tiny_base, capsys):
    before = digest(adapter)
    fails(["merge", "--adapter", str(adapter), "--base", str(tiny_base), "--output", str(adapter / "merged")], capsys, "lies inside the input")
    assert digest(adapter) == before and not (adapter / "merged").exists()


def test_build_output_containing_the_calibration_data_is_refused(tmp_path, tiny_base, capsys):
    (tmp_path / "work").mkdir()
    data = make_data(tmp_path / "work" / "d.jsonl", 20)
    before = digest(data.parent)
    fails(["build", "--base", str(tiny_base), "--calibration", str(data), "--output", str(data.parent), "--overwrite", "--device", "cpu"],
          capsys, "contains the input")
    assert digest(data.parent) == before


# 2. eval --output is staged like every other output


def test_eval_output_equal_to_its_data_is_refused(tmp_path, tiny_base, capsys):
    data = make_data(tmp_path / "e.jsonl", 12)
    before = digest(data)
    fails(["eval", "--model", str(tiny_base), "--data", str(data), "--output", str(data), "--device", "cpu"], capsys, "is the input")
    fails(["eval", "--model", str(tiny_base), "--data", str(data), "--output", str(data), "--overwrite", "--device", "cpu"], capsys,
          "is the input")
    assert digest(data) == before


def test_eval_output_needs_overwrite_and_is_atomic(tmp_path, tiny_base, capsys):
    data = make_data(tmp_path / "e.jsonl", 12)
    out = tmp_path / "r.json"
    out.write_text("{}")
    fails(["eval", "--model", str(tiny_base), "--data", str(data), "--output", str(out), "--device", "cpu"], capsys, "--overwrite")
    assert out.read_text() == "{}"
    assert main(["eval", "--model", str(tiny_base), "--data", str(data), "--output", str(out), "--overwrite", "--device", "cpu",
                 "--no-exact-match"]) == 0
    assert "nll" in json.loads(out.read_text()) and not list(tmp_path.glob(".r.json.tmp-*"))


# 4 and 13. settings refused before any work


@pytest.mark.parametrize("flags,match", [
    (["--eval-fraction", "1"], "--eval-fraction"),
    (["--eval-fraction", "1.5"], "--eval-fraction"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--micro-batch-size", "0"], "--micro-batch-size"),
    (["--loss-chunk", "0"], "--loss-chunk"),
    (["--targets", "q_proj("], "--targets"),
    (["--dtype", "float8"], "dtype"),
    (["--schedule", "cyclic"], "--schedule"),
])
def test_train_settings_refused_before_any_io(tmp_path, capsys, flags, match):
    # the model and data do not even exist: the settings must fail first
    fails(["train", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"), "--output", str(tmp_path / "a"),
           *flags], capsys, match)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("flags,match", [
    (["--eig-floor", "0"], "--eig-floor"),
    (["--eig-floor=-1e-3"], "--eig-floor"),
    (["--stats-dtype", "float16"], "statistics dtype"),
    (["--dtype", "int8"], "dtype"),
    (["--targets", "[unclosed"], "--targets"),
    (["--samples", "0"], "--samples"),
])
def test_build_settings_refused_before_any_io(tmp_path, capsys, flags, match):
    fails(["build", "--base", str(tmp_path / "no-model"), "--calibration", str(tmp_path / "no.jsonl"), "--output", str(tmp_path / "e"),
           *flags], capsys, match)


def test_targets_matching_nothing_in_train(tmp_path, emu, tiny_data, capsys):
    fails(["train", "--model", str(emu), "--data", str(tiny_data), "--output", str(tmp_path / "a"), "--targets", "no_such_layer",
           "--steps", "1", "--device", "cpu"], capsys, "--targets")


# 5. non-finite results are never written as a success


def test_overflowing_factors_are_refused(tmp_path, tiny_base, tiny_data, capsys):
    """Weights far beyond float16's range: the factors overflow in the cast; nothing is written."""
    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    f = next(base.glob("*.safetensors"))
    t = load_file(f)
    key = next(k for k in t if k.endswith("layers.0.mlp.up_proj.weight"))
    t[key] = t[key] * 1e6
    save_file(t, f, metadata={"format": "pt"})
    fails(["build", "--base", str(base), "--calibration", str(tiny_data), "--output", str(tmp_path / "e"), "--method", "svd",
           "--dtype", "float16", "--samples", "8", "--device", "cpu"], capsys, "non-finite")
    assert not (tmp_path / "e").exists()


def test_non_finite_tensors_are_never_saved(tmp_path):
    """The check every emulator shard, corrected adapter and merged shard goes through."""
    from emloc.artifacts import save_finite
    from emloc.errors import EmlocError

    with pytest.raises(EmlocError, match="b.up holds non-finite"):
        save_finite({"a": torch.ones(2), "b.up": torch.tensor([1.0, float("inf")], dtype=torch.float16)}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    save_finite({"codes": torch.zeros(2, dtype=torch.uint8)}, tmp_path / "y.safetensors")  # integer tensors are not checked


def test_layer_without_statistics_is_refused():
    from emloc.emulator import _check_statistics
    from emloc.errors import EmlocError

    with pytest.raises(EmlocError, match="no calibration input"):
        _check_statistics("model.layers.0.mlp.up_proj", torch.tensor(0.0))
    with pytest.raises(EmlocError, match="no calibration input"):
        _check_statistics("model.layers.0.mlp.up_proj", torch.tensor(float("nan")))
    _check_statistics("model.layers.0.mlp.up_proj", torch.tensor(3.0))


# 6. adapters emloc would silently mangle are refused; PEFT's pattern rules


def _edit_adapter(folder: Path, config: dict | None = None, extra: dict | None = None) -> None:
    if config:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(config)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if extra:
        t = load_file(folder / "adapter_model.safetensors")
        t.update(extra)
        save_file(t, folder / "adapter_model.safetensors")


@pytest.mark.parametrize("config,extra,match", [
    ({"bias": "all"}, None, "bias"),
    ({"bias": "lora_only"}, None, "bias"),
    (None, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}, "lora_embedding_A"),
    ({"trainable_token_indices": [1, 2]}, None, "trainable_token_indices"),
    (None, {"base_model.model.model.layers.0.mlp.up_proj.bias": torch.zeros(64)}, "up_proj.bias"),
])
def test_adapters_with_parts_emloc_would_drop_are_refused(tmp_path, adapter, emu, tiny_base, capsys, config, extra, match):
    _edit_adapter(adapter, config, extra)
    before = digest(adapter)
    fails(["correct", "--adapter", str(adapter), "--emulator", str(emu), "--output", str(tmp_path / "c")], capsys, match)
    fails(["merge", "--adapter", str(adapter), "--base", str(tiny_base), "--output", str(tmp_path / "m")], capsys, match)
    assert digest(adapter) == before and not (tmp_path / "c").exists() and not (tmp_path / "m").exists()


def test_alpha_pattern_is_a_regex_as_in_peft():
    from emloc.correct import scaling

    cfg = {"lora_alpha": 16, "alpha_pattern": {r"layers\.1\..*up_proj": 4, "q_proj": 8}}
    assert scaling(cfg, "model.layers.1.mlp.up_proj", 8) == 0.5       # regex over the name
    assert scaling(cfg, "model.layers.0.mlp.up_proj", 8) == 2.0       # no match: lora_alpha
    assert scaling(cfg, "model.layers.0.self_attn.q_proj", 8) == 1.0  # plain suffix still matches
    assert scaling(cfg, "model.layers.0.self_attn.xq_proj", 8) == 2.0  # ... but only at a name boundary


def test_malformed_adapter_config_is_an_error(tmp_path, adapter, emu, capsys):
    (adapter / "adapter_config.json").write_text("{not json")
    fails(["correct", "--adapter", str(adapter), "--emulator", str(emu), "--output", str(tmp_path / "c")], capsys, "not valid JSON")


# 7. labels


class _RewritingTemplate:
    """A template that drops earlier assistant turns once a later one follows (as reasoning models do)."""

    template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n...<|im_end|>\n"
                "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_template_that_rewrites_earlier_turns_is_refused():
    from emloc.data import encode
    from emloc.errors import EmlocError

    tok = make_tokenizer()
    tok.chat_template = _RewritingTemplate.template
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]}
    with pytest.raises(EmlocError, match="rewrites the conversation"):
        encode(rec, tok, 64)


def test_content_part_lists_are_text_not_python_reprs():
    from emloc.data import encode

    tok = make_tokenizer()
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "what is the capital of france ?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "paris"}]}]}
    plain = {"messages": [{"role": "user", "content": "what is the capital of france ?"}, {"role": "assistant", "content": "paris"}]}
    a, b = encode(parts, tok, 64), encode(plain, tok, 64)
    assert a.input_ids == b.input_ids and a.labels == b.labels and a.answer == "paris"


def test_records_past_max_length_are_reported(tmp_path, caplog):
    from emloc.data import load_examples

    tok = make_tokenizer()
    long_q = " ".join(["what"] * 40)
    rows = [{"prompt": long_q + " ", "completion": "paris ."}, {"prompt": "hi ", "completion": "hello ."}]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="emloc"):
        kept = load_examples(f, tok, 16)
    assert len(kept) == 1 and "1 of 2 records" in caplog.text


def test_answer_only_at_position_zero_is_not_a_division_by_zero(tmp_path):
    """A record whose only labelled token is the first: nothing to predict; it is skipped, and a loss over
    zero answer tokens is 0 with a graph, not NaN."""
    from emloc.data import IGNORE, Example, load_examples
    from emloc.loss import answer_nll
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "paris"}) + "\n" + json.dumps({"text": "hello there"}) + "\n")
    kept = load_examples(f, tok, 16)
    assert len(kept) == 1 and len(kept[0].input_ids) == 2
    from .conftest import make_model_dir

    model = AutoModelForCausalLM.from_pretrained(make_model_dir(tmp_path / "m", "llama"))
    e = Example([5, 6, 7], [5, IGNORE, IGNORE], 1, "x")
    ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
    nll, n = answer_nll(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    assert n == 0 and float(nll) == 0.0
    nll.backward()  # connected to the graph


def test_non_utf8_and_bom_data(tmp_path, emu, capsys):
    from emloc.data import read_jsonl

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "hi ", "completion": "hello"}).encode() + b"\n")
    assert read_jsonl(bom)[0]["completion"] == "hello"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"prompt": "caf", "completion": "x"}).encode().replace(b"caf", b"caf\xe9") + b"\n")
    fails(["train", "--model", str(emu), "--data", str(latin), "--output", str(tmp_path / "a"), "--device", "cpu"], capsys, "not UTF-8")


# 8. resume key


def test_resume_refuses_changed_data_content_and_eval_data(tmp_path, tiny_emulator):
    from emloc import TrainConfig
    from emloc.checkpoint import config_key

    data = make_data(tmp_path / "d.jsonl", 20)
    held = make_data(tmp_path / "e.jsonl", 10, seed=1)
    cfg = TrainConfig(steps=2)
    k = config_key(cfg, "fp", data, held)
    assert k != config_key(cfg, "fp", data, None)
    assert k != config_key(cfg, "fp", data, make_data(tmp_path / "e2.jsonl", 10, seed=2))
    make_data(data, 20, seed=5)  # same path, new content
    assert k != config_key(cfg, "fp", data, held)


def test_checkpoint_is_loaded_without_pickled_code(tmp_path):
    """A checkpoint is read with weights_only: a pickle that would run code is refused."""
    from emloc.checkpoint import load_checkpoint

    ck = tmp_path / "a.checkpoint"
    ck.mkdir()
    (ck / "state.json").write_text(json.dumps({"key": "k", "step": 1, "log": []}))
    save_file({"x": torch.zeros(1)}, ck / "adapter.safetensors")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"a": Evil()}, ck / "optimizer.pt")
    torch.save({}, ck / "scheduler.pt")
    torch.save([], ck / "rng.pt")
    from emloc.errors import EmlocError

    with pytest.raises(EmlocError, match="unreadable"):
        load_checkpoint(ck, "k")


def test_foreign_adapter_naming_another_model_is_refused(tmp_path, adapter, emu, capsys):
    """An adapter trained outside emloc (no manifest) names its model only in adapter_config.json."""
    (adapter / "manifest.json").unlink()
    other = tmp_path / "other-emu"
    other.mkdir()
    _edit_adapter(adapter, {"base_model_name_or_path": str(other)})
    fails(["correct", "--adapter", str(adapter), "--emulator", str(emu), "--output", str(tmp_path / "c")], capsys, "not on the emulator")


# 9. merge reads the weights transformers reads


def test_merge_ignores_safetensors_outside_the_index(tmp_path, tiny_base, capsys):
    from emloc import merge_adapter
    from emloc.models import weight_files

    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    shutil.copy(base / "model.safetensors", base / "consolidated.safetensors")
    assert weight_files(base) == [base / "model.safetensors"]
    ad = tmp_path / "plain"
    from emloc import TrainConfig, train_adapter

    train_adapter(base, make_data(tmp_path / "d.jsonl", 12), ad, TrainConfig(steps=1, batch_size=2, rank=2, device="cpu"))
    out = merge_adapter(base, ad, tmp_path / "merged")
    keys = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(keys) == sorted(load_file(base / "model.safetensors"))  # each tensor once


# 13. damaged inputs


def test_truncated_safetensors_is_an_error(tmp_path, tiny_data, tiny_base, capsys):
    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    fails(["build", "--base", str(base), "--calibration", str(tiny_data), "--output", str(tmp_path / "e"), "--samples", "4",
           "--device", "cpu"], capsys, "truncated")


def test_base_without_tokenizer_is_an_error(tmp_path, tiny_data, tiny_base, capsys):
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_base / name, base / name)
    fails(["build", "--base", str(base), "--calibration", str(tiny_data), "--output", str(tmp_path / "e"), "--device", "cpu"], capsys,
          "tokenizer")


# 11 and 12. packaged models: checksum before use, one conversion at a time


def test_packaged_model_checksum_and_conversion_lock(tmp_path, monkeypatch):
    import emloc.models as m
    from emloc.errors import EmlocError

    part = tmp_path / "pkg" / "model.gguf"
    part.parent.mkdir()
    part.write_bytes(b"not the model")
    spec = m.PackagedModel(("pkg",), "model.gguf", "pip install pkg", hashlib.sha256(b"the model").hexdigest())
    monkeypatch.setattr(m, "_package_dir", lambda name: part.parent)
    with pytest.raises(EmlocError, match="checksum mismatch"):
        m._assemble_gguf(spec, tmp_path)
    part.write_bytes(b"the model")
    assert m._assemble_gguf(spec, tmp_path) == part
    assert all(s.sha256 for s in m.PACKAGED_MODELS.values())  # every packaged model is checked
    # a process that finds the conversion done by another while it waited for the lock does not redo it
    monkeypatch.setenv("EMLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(m.PACKAGED_MODELS, "fake", spec)
    calls = []

    def convert(s, name, target):
        calls.append(name)
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text("{}")
        save_file({"w": torch.zeros(1)}, target / "model.safetensors")
        (target / m.SOURCE).write_text(json.dumps({"sha256": s.sha256}))

    monkeypatch.setattr(m, "_convert", convert)
    assert m.resolve_model("fake") == tmp_path / "cache" / "models" / "fake"
    assert m.resolve_model("fake") == tmp_path / "cache" / "models" / "fake"
    assert calls == ["fake"]
    (tmp_path / "cache" / "models" / "fake" / m.SOURCE).write_text(json.dumps({"sha256": "old"}))
    m.resolve_model("fake")
    assert len(calls) == 2  # a cache converted from other bytes is converted again


def test_stage_functions_take_the_previous_argument_order_with_a_warning(tmp_path, tiny_emulator, tiny_data):
    from emloc import TrainConfig, correct_adapter, train_adapter
    from emloc.correct import CorrectConfig
    from emloc.evaluate import EvalConfig, evaluate

    cfg = TrainConfig(steps=1, batch_size=2, rank=2, device="cpu")
    with pytest.warns(FutureWarning, match="old order"):  # (model, data, output, config, eval_data, overwrite)
        ad = train_adapter(tiny_emulator, tiny_data, tmp_path / "ad", cfg, tiny_data, False)
    assert json.loads((ad / "manifest.json").read_text())["eval_data"] == str(tiny_data.resolve())
    with pytest.warns(FutureWarning, match="old order"):  # (adapter, output, emulator, base, config, overwrite)
        cor = correct_adapter(ad, tmp_path / "cor", None, None, CorrectConfig(mode="none"), False)
    assert (cor / "adapter_config.json").is_file()
    with pytest.warns(FutureWarning, match="old order"):  # (model, data, adapter, config, output, overwrite)
        evaluate(tiny_emulator, tiny_data, ad, EvalConfig(samples=2, device="cpu", exact_match=False), tmp_path / "e.json")
    assert json.loads((tmp_path / "e.json").read_text())["records"] == 2


def test_peak_rss_is_the_process_own_not_its_parents():
    # ru_maxrss carries over fork and exec: a bench child started while its parent held a converted
    # 1.5B (8.8 GB) reported 8.8 GB for a 0.5B's training. The peak must be the child's own.
    import subprocess
    import sys

    from emloc.artifacts import peak_memory_mb

    held = bytearray(512 * 2**20)
    held[::4096] = b"\1" * len(held[::4096])  # touch every page, so the parent's RSS holds them
    code = "from emloc.artifacts import peak_memory_mb; print(peak_memory_mb()['peak_rss_mb'])"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert peak_memory_mb()["peak_rss_mb"] > 512
    assert child < 256, f"the child reported {child} MB: its parent's memory"
    del held
