import pytest
import torch

from dskd_pipe.pipeline.models import (ModelError, embedding_parts, head_parts, last_hidden_state, load_causal_lm,
                                       load_tokenizer, model_fingerprint, save_tiny_model, tokenizer_fingerprint)

TOK = "tests/fixtures/tokenizers"


@pytest.mark.parametrize("arch,tok", [("gpt2", "gpt2"), ("llama", "llama2"), ("qwen2", "qwen2"),
                                      ("gemma3", "gpt2")])
def test_head_parts_rebuild_the_models_logits(tmp_path, arch, tok):
    tokenizer = load_tokenizer(f"{TOK}/{tok}")
    folder = save_tiny_model(tmp_path / arch, arch, tokenizer, d_model=32, layers=1)
    model = load_causal_lm(str(folder), device="cpu")
    ids = torch.randint(0, len(tokenizer), (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    hidden = last_hidden_state(model, ids, mask)
    head = head_parts(model)
    z = torch.nn.functional.linear(hidden, head["weight"], head["bias"]) * head["logit_scale"]
    if head["final_logit_softcap"]:
        z = head["final_logit_softcap"] * torch.tanh(z / head["final_logit_softcap"])
    torch.testing.assert_close(z, model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
    emb = embedding_parts(model)
    assert emb["weight"].shape == (len(tokenizer), 32)
    assert emb["embed_scale"] == pytest.approx(32 ** 0.5 if arch == "gemma3" else 1.0)


def test_fingerprints_change_with_weights_and_tokenizer(tmp_path):
    gpt2, llama = load_tokenizer(f"{TOK}/gpt2"), load_tokenizer(f"{TOK}/llama2")
    assert tokenizer_fingerprint(gpt2) != tokenizer_fingerprint(llama)
    a = save_tiny_model(tmp_path / "a", "gpt2", gpt2, d_model=32, layers=1, seed=0)
    b = save_tiny_model(tmp_path / "b", "gpt2", gpt2, d_model=32, layers=1, seed=1)
    fa = model_fingerprint(str(a), load_causal_lm(str(a), device="cpu"))
    fb = model_fingerprint(str(b), load_causal_lm(str(b), device="cpu"))
    assert fa["config_sha256"] == fb["config_sha256"]
    assert fa["weights_sha256"] != fb["weights_sha256"]


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load"):
        load_tokenizer(str(tmp_path / "missing"))
