import torch

from emloc.data import IGNORE
from emloc.loss import answer_nll


def test_chunked_answer_loss_equals_full_logits_loss_and_gradient(tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(4, 60, (3, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    labels[2, 8:] = IGNORE
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    nll, n = answer_nll(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, chunk=4)  # several chunks
    assert n == int((labels[:, 1:] != IGNORE).sum())
    nll.backward()
    g1 = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss * n  # HF mean -> sum
    ref.backward()
    g2 = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the head is restored afterwards
    head = model.get_base_model().get_output_embeddings()
    assert model(input_ids=ids).logits.shape[-1] == head.out_features
