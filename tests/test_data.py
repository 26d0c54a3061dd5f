
import pytest

from emloc import EmlocError
from emloc.data import IGNORE, collate, encode, read_jsonl

from .conftest import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def labelled(tok, ex):
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_messages_loss_on_assistant_turns_only(tok):
    rec = {"messages": [{"role": "user", "content": "what is the capital of france ?"},
                        {"role": "assistant", "content": "paris ."},
                        {"role": "user", "content": "and italy ?"},
                        {"role": "assistant", "content": "rome ."}]}
    ex = encode(rec, tok, 128)
    text = labelled(tok, ex)
    assert "paris" in text and "rome" in text
    assert "capital" not in text and "user" not in text and "italy" not in text
    assert ex.answer == "rome ." and tok.decode(ex.input_ids[ex.prompt_len:]).startswith("rome")


def test_prompt_completion_and_text(tok):
    ex = encode({"prompt": "what is two plus two ? ", "completion": "four ."}, tok, 64)
    assert labelled(tok, ex).split()[:2] == ["four", "."] and ex.labels[-1] == tok.eos_token_id
    ex = encode({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]}, tok, 64)
    assert labelled(tok, ex).startswith("hello")
    ex = encode({"text": "the cat is big"}, tok, 64)
    assert all(t != IGNORE for t in ex.labels) and ex.answer is None


def test_truncation_and_collate(tok):
    ex = [encode({"text": " ".join(["cat"] * 50)}, tok, 10), encode({"text": "dog"}, tok, 10)]
    assert len(ex[0].input_ids) == 10
    b = collate(ex, 0)
    assert b["input_ids"].shape == (2, 10) and b["attention_mask"][1].sum() == len(ex[1].input_ids)
    assert (b["labels"][1, len(ex[1].input_ids):] == IGNORE).all()


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    ("", "empty"),
    ("not json\n", "not valid JSON"),
    ("[1, 2]\n", "not a JSON object"),
    ('{"question": "q", "answer": "a"}\n', "expected 'prompt'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant turn"),
    ('{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', "different format"),
])
def test_bad_data_files(tmp_path, content, match):
    p = tmp_path / "data.jsonl"
    if content is not None:
        p.write_text(content)
    with pytest.raises(EmlocError, match=match):
        read_jsonl(p)
