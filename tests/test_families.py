"""The family table: stages get model facts from `emloc.families`, and one entry changes them."""

import dataclasses

import pytest
from transformers import AutoConfig

import emloc.families as fam
from emloc.models import empty_model, find_blocks

from .conftest import TINY


def _config(family="llama", **extra):
    kw = dict(TINY[family])
    return AutoConfig.for_model(kw.pop("model_type"), vocab_size=64, **kw, **extra)


def test_causal_lm_is_the_default_and_builds_on_meta():
    cfg = _config()
    assert fam.family_of(cfg) is fam.CAUSAL_LM
    model = empty_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    name, blocks = find_blocks(model)
    assert name == "model.layers" and len(blocks) == 2


def test_an_entry_overrides_the_generic_search(monkeypatch):
    """A model type whose blocks are given by path never reaches the generic search (e.g. a VLM whose
    vision tower is the larger stack)."""
    cfg = _config()
    model = empty_model(cfg)

    def refuse(_):
        raise AssertionError("the generic search ran")

    monkeypatch.setattr(fam, "_largest_block_stack", refuse)
    with pytest.raises(AssertionError, match="generic search"):
        find_blocks(model)
    monkeypatch.setitem(fam.BY_MODEL_TYPE, "llama", dataclasses.replace(fam.CAUSAL_LM, name="pinned", blocks=("model.layers",)))
    name, blocks = find_blocks(model)
    assert name == "model.layers" and blocks is model.model.layers


def test_logit_post_processing_is_a_family_fact():
    assert not fam.CAUSAL_LM.post_processes_logits(_config())
    assert fam.CAUSAL_LM.post_processes_logits(_config(final_logit_softcapping=30.0))
    plain = dataclasses.replace(fam.CAUSAL_LM, logit_postprocessing=())
    assert not plain.post_processes_logits(_config(final_logit_softcapping=30.0))
