import re

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


def _no_hub(monkeypatch):
    """Any call into transformers' loaders fails the test: a missing local path must not reach the hub client."""
    import transformers

    def called(*args, **kwargs):
        raise AssertionError("the hub / transformers loader was called")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", called)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", called)


def test_a_missing_local_path_fails_at_once_without_the_hub(tmp_path, monkeypatch):
    """Issue 14: `runs/x` (runs/ exists), `./x`, `/abs/x`, `~/x` and `a/b/c` used to spend ~25 s in hub retries."""
    _no_hub(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("runs/student", "./student", str(tmp_path / "missing"), "~/no-such-model-here", "a/b/c"):
        for load in (load_tokenizer, load_causal_lm):
            with pytest.raises(ModelError, match=rf"^{re.escape(name)}: no such folder\. Pass an existing model "
                                                 r"folder or a hub id \(owner/name\)\.$"):
                load(name)


def test_a_folder_without_model_or_tokenizer_files_is_named(tmp_path, monkeypatch):
    _no_hub(monkeypatch)
    with pytest.raises(ModelError, match=r"no tokenizer files \(tokenizer.json, tokenizer_config.json\)"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ModelError, match=r"no config.json, so not a model folder"):
        load_causal_lm(str(tmp_path))
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"a file, not a model folder"):
        load_causal_lm(str(tmp_path / "f.bin"))


def test_tokenizer_errors_fit_on_one_line(tmp_path, monkeypatch):
    import transformers

    def multi_line(*args, **kwargs):
        raise OSError("Couldn't instantiate the backend tokenizer from one of: \n(1) a file, \n(2) a slow one")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", multi_line)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError) as e:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(e.value) and "one of: (1) a file, (2) a slow one). Check the folder's files." in str(e.value)
