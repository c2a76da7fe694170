"""The LLM loader: local tiny model, identifier tokens, new-token tables, LoRA and frozen base weights."""

import pytest
import torch

from helpers import assert_merged_lora_exact
from scene3d.constants import OBJ_PLACEHOLDER, SEG_TOKEN
from scene3d.llm.loader import LLMConfig, load_llm, load_tokenizer
from scene3d.llm.tiny import TinyLLMConfig, build_tiny_llm, save_tiny_llm

TINY = TinyLLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, seed=3)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llm(tmp_path_factory.mktemp("llm") / "tiny", TINY)


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_llm(tiny_dir, num_obj_tokens=10, lora_r=4)


def test_local_dir_round_trip(tiny_dir):
    ref = build_tiny_llm(TINY)
    tok = load_tokenizer(tiny_dir)
    text = "the brown chair , left of the desk ?"
    assert tok(text)["input_ids"] == ref.tokenizer(text)["input_ids"]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.convert_ids_to_tokens(tok("zebra", add_special_tokens=False)["input_ids"]) == ["[UNK]"]
    lm = load_llm(tiny_dir, num_obj_tokens=3, lora_r=0)
    for (n, a), (_, b) in zip(lm.causal_lm.state_dict().items(), ref.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llm(tmp_path / "nope")
    with pytest.raises(ValueError):
        LLMConfig(num_obj_tokens=0)


def test_special_tokens_single_ids(lm):
    tok = lm.tokenizer
    ids = tok("<OBJ000> <OBJ009> [SEG] <obj_feat> chair", add_special_tokens=False)["input_ids"]
    assert ids[:4] == [lm.obj_token_ids[0], lm.obj_token_ids[9], lm.seg_token_id, lm.placeholder_id]
    assert tok.convert_ids_to_tokens(ids[:4]) == ["<OBJ000>", "<OBJ009>", SEG_TOKEN, OBJ_PLACEHOLDER]
    assert lm.vocab_size == len(tok)


def test_embed_and_logits_routing(lm):
    ids = torch.tensor([[5, lm.obj_token_ids[3], 7, lm.seg_token_id]])
    e = lm.embed(ids)
    base = lm.get_input_embeddings().weight
    assert torch.equal(e[0, 0], base[5]) and torch.equal(e[0, 2], base[7])
    assert torch.equal(e[0, 1], lm.new_embed.weight[3])
    assert torch.equal(e[0, 3], lm.new_embed.weight[lm.config.num_obj_tokens])
    out = lm(e)
    head = lm.causal_lm.get_output_embeddings().weight
    torch.testing.assert_close(out.logits[..., : lm.n_base_rows], out.hidden @ head.T)
    torch.testing.assert_close(out.logits[..., lm.obj_token_ids[0]], out.hidden @ lm.new_head.weight[0])
    with pytest.raises(ValueError, match="input_ids"):
        lm.embed(torch.tensor([[lm.vocab_size]]))


def test_lora_starts_as_identity_of_base(lm):
    # peft initialises LoRA B to zero: logits over the base vocabulary equal the plain base model's
    ref = build_tiny_llm(TINY).model
    ids = torch.tensor([[4, 9, 30, 41, 5]])
    with torch.no_grad():
        torch.testing.assert_close(lm(lm.embed(ids)).logits[..., : lm.n_base_rows], ref(input_ids=ids).logits)


def test_only_lora_and_new_rows_train(lm):
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    assert all("lora_" in n or n.startswith(("new_embed", "new_head")) for n in trainable), trainable
    assert any("mlp" in n for n in trainable) and any("self_attn" in n for n in trainable)
    # perturb LoRA B so gradients reach A too, then backprop a loss
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    ids = torch.tensor([[4, lm.obj_token_ids[1], 30, lm.seg_token_id]])
    lm.zero_grad(set_to_none=True)
    lm(lm.embed(ids)).logits.logsumexp(-1).sum().backward()
    for n, p in lm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    # only the rows of new tokens that were used receive gradient in the new embedding table
    used = {1, lm.config.num_obj_tokens}
    rows = set(lm.new_embed.weight.grad.abs().sum(1).nonzero().flatten().tolist())
    assert rows == used
    lm.zero_grad(set_to_none=True)


def test_merged_lora_is_exact_and_restores_weights(tiny_dir):
    lm = load_llm(tiny_dir, num_obj_tokens=10, lora_r=4)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # non-zero adapters, so merging changes the base weights
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    lm.eval()
    assert_merged_lora_exact(lm, torch.tensor([[4, 9, lm.obj_token_ids[2], 30, lm.seg_token_id]]), tol=1e-5)
    from peft.tuners.lora import LoraLayer

    assert not any(m.merged for m in lm.modules() if isinstance(m, LoraLayer))
    # training mode: the context changes nothing
    lm.train()
    with lm.merged_lora():
        assert all(torch.equal(p, before[n]) for n, p in lm.named_parameters())


def test_merged_lora_reuses_merge_until_a_weight_changes(tiny_dir):
    lm = load_llm(tiny_dir, num_obj_tokens=10, lora_r=4).eval()
    ids = torch.tensor([[4, 9, 30, lm.seg_token_id]])
    b_name, b = next((n, p) for n, p in lm.named_parameters() if "lora_B" in n)

    def merged_params():
        with torch.no_grad(), lm.merged_lora():
            return {n: p for n, p in lm.named_parameters() if "base_layer" in n}, lm(lm.embed(ids)).logits

    first, _ = merged_params()
    again, _ = merged_params()
    assert all(again[n] is first[n] for n in first), "nothing changed, yet the merge was redone"
    with torch.no_grad():
        b.normal_(0, 0.05)  # an in-place update, as an optimizer step makes
        ref = lm(lm.embed(ids)).logits
    after, out = merged_params()
    assert any(after[n] is not first[n] for n in first), "an adapter changed but the stale merge was used"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_train_base_trains_every_weight(tiny_dir):
    lm = load_llm(tiny_dir, num_obj_tokens=10, lora_r=0, train_base=True)
    assert all(p.requires_grad for p in lm.parameters())
    assert not any("lora_" in n for n, _ in lm.named_parameters())
    ids = torch.tensor([[4, lm.obj_token_ids[1], 30, lm.seg_token_id]])
    lm(lm.embed(ids)).logits.logsumexp(-1).sum().backward()
    assert lm.get_input_embeddings().weight.grad is not None
    assert all(p.grad is not None for n, p in lm.named_parameters() if "layers.0." in n)
    with pytest.raises(ValueError, match="lora_r=0"):
        LLMConfig(lora_r=8, train_base=True)
