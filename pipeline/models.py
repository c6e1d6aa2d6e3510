"""Loading models and tokenizers, the parts of a model the store keeps, and tiny models for tests and the demo.

MODEL arguments are a hub id, a local folder, or a `.gguf` file (converted once into a cached folder by
`pipeline/gguf.py`, which needs the `gguf` extra). `trust_remote_code` is off unless asked for; weights are loaded
from safetensors when the checkpoint has them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


class ModelError(ValueError):
    """A model or tokenizer cannot be used as asked; the message names it and the fix."""


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _gguf_folder(name_or_path: str) -> str:
    """A path ending in .gguf -> its converted folder (converted once, cached; pipeline/gguf.py)."""
    if str(name_or_path).endswith(".gguf"):
        from dskd_pipe.pipeline.gguf import converted_folder

        return str(converted_folder(name_or_path))
    return name_or_path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def _path_like(name: str) -> bool:
    """Whether a model name can only mean a local path: a hub id is 'name' or 'owner/name', never './x', '/x',
    '~/x' or 'a/b/c', and 'runs/x' is a path when the folder runs/ exists here."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name in (".", "..") or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def _local_or_hub(name_or_path: str) -> str:
    """The folder to load, or the hub id as given. A path-like name that does not exist fails here at once, rather
    than after the hub client's retries (about 25 s without a network)."""
    name_or_path = _gguf_folder(str(name_or_path))
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local)
    if local.exists():
        raise ModelError(f"{name_or_path}: a file, not a model folder. Pass the folder that holds config.json "
                         "(or a .gguf file, or a hub id).")
    if _path_like(name_or_path):
        raise ModelError(f"{name_or_path}: no such folder. Pass an existing model folder or a hub id "
                         "(owner/name).")
    return name_or_path


def _one_line(e: BaseException) -> str:
    """A library's (often multi-line) error message as one line."""
    return " ".join(str(e).split())


def _fix(folder: Path) -> str:
    if folder.is_dir():
        return "Check the folder's files."
    return "Check the hub id and the network, or pass a local folder (HF_HUB_OFFLINE=1 uses the local cache only)."


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    name_or_path = _local_or_hub(name_or_path)
    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(f"{name_or_path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); save the "
                         "tokenizer into the model folder (tokenizer.save_pretrained).")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{name_or_path}: cannot load a tokenizer ({_one_line(e)}). {_fix(folder)}") from e
    if len(tok) == 0:
        raise ModelError(f"{name_or_path}: the tokenizer is empty (len 0); check its files.")
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{name_or_path}: a fast tokenizer (tokenizer.json) is needed for character offsets.")
    return tok


def load_causal_lm(name_or_path: str, dtype: torch.dtype | None = None, device: str | None = None,
                   trust_remote_code: bool = False, device_map: str | None = None):
    """A causal LM in eval mode on `device`, in `dtype` (default: bf16 on GPU, fp32 on CPU).

    device_map="auto": spread over the node's GPUs (and CPU memory beyond them) by accelerate's dispatch, for a
    model larger than one GPU; its inputs go to the device of its input embeddings (`input_device`)."""
    from transformers import AutoModelForCausalLM

    name_or_path = _local_or_hub(name_or_path)
    folder = Path(name_or_path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ModelError(f"{name_or_path}: no config.json, so not a model folder (save one with "
                         "model.save_pretrained).")
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    kwargs = {}
    if device_map:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ModelError("--device-map needs the `accelerate` package: pip install accelerate") from None
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype,
                                                     trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{name_or_path}: cannot load a causal LM ({_one_line(e)}). {_fix(folder)}") from e
    return (model if device_map else model.to(device)).eval()


def input_device(model) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings (the first device of a dispatched model)."""
    return model.get_input_embeddings().weight.device


def eos_token_id(tokenizer) -> int:
    """The EOS id appended to every response (spec/dskd.md "Sequences")."""
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token; set eos_token in its config.")
    return int(tokenizer.eos_token_id)


def pad_token_id(tokenizer) -> int:
    """Right padding uses the tokenizer's pad token, else EOS (GPT-2/Llama family)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_token_id(tokenizer)


def last_hidden_state(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The post-final-norm last hidden state [B, T, d]: exactly what the LM head consumes."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def head_parts(model) -> dict:
    """What rebuilds the model's logits from its last hidden state: z = (h W^T + b) * logit_scale, then softcap.

    Returns {"weight": [V, d], "bias": [V] or None, "logit_scale": float, "final_logit_softcap": float or None}.
    Covers plain heads (GPT-2, Llama, Qwen2, Mistral), Gemma-style final soft-capping, Cohere's logit_scale and
    Granite's logits_scaling (a divisor).
    """
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no output embeddings (LM head).")
    scale, softcap = logit_transform(model)
    bias = getattr(head, "bias", None)
    return {
        "weight": head.weight.detach(),
        "bias": bias.detach() if bias is not None else None,
        "logit_scale": scale,
        "final_logit_softcap": softcap,
    }


def logit_transform(model) -> tuple[float, float | None]:
    """(logit_scale, final_logit_softcap) that the architecture applies after the LM head: z = (h W^T + b) * scale,
    then cap * tanh(z / cap). Cohere's logit_scale multiplies, Granite's logits_scaling divides, Gemma soft-caps."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    scale = float(getattr(text_cfg, "logit_scale", None) or 1.0)
    if getattr(text_cfg, "logits_scaling", None):
        scale /= float(text_cfg.logits_scaling)
    softcap = getattr(text_cfg, "final_logit_softcapping", None)
    return scale, float(softcap) if softcap else None


def embedding_parts(model) -> dict:
    """The input embedding table and the scale the architecture applies on lookup (Gemma: sqrt(d))."""
    emb = model.get_input_embeddings()
    scale = getattr(emb, "embed_scale", None)
    scale = float(scale) if scale is not None else 1.0
    return {"weight": emb.weight.detach(), "embed_scale": scale}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(name_or_path: str, model) -> dict:
    """Identifies a teacher: its name, hub revision when known, weight-file hashes for a local folder, config hash."""
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
        cfg.pop(volatile, None)
    fp = {
        "name": str(name_or_path),
        "revision": getattr(model.config, "_commit_hash", None),
        "architecture": type(model).__name__,
        "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest(),
    }
    folder = Path(name_or_path)
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        fp["weights_sha256"] = {f.name: _sha256_file(f) for f in files}
    return fp


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation (vocab, merges, normaliser, special tokens) and its EOS."""
    body = tokenizer.backend_tokenizer.to_str()
    return hashlib.sha256((body + f"|eos={tokenizer.eos_token}").encode()).hexdigest()


TINY_ARCHITECTURES = ("gpt2", "llama", "qwen2", "gemma3")


def tiny_causal_lm(arch: str, tokenizer, d_model: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
                   max_positions: int = 1024):
    """A small randomly initialised causal LM of a real architecture over a real tokenizer's vocabulary.

    Used by tests and the demo: the code paths are those of real checkpoints, only the sizes are small.
    """
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig,
                              Qwen2Config)

    vocab = len(tokenizer)
    eos = eos_token_id(tokenizer)
    common = dict(vocab_size=vocab, eos_token_id=eos, bos_token_id=tokenizer.bos_token_id or eos,
                  pad_token_id=pad_token_id(tokenizer))
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=d_model, n_layer=layers, n_head=heads, n_positions=max_positions, **common)
    elif arch == "llama":
        cfg = LlamaConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                          tie_word_embeddings=False, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          max_position_embeddings=max_positions, tie_word_embeddings=True, **common)
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=1, head_dim=d_model // heads,
                               max_position_embeddings=max_positions, sliding_window=64,
                               final_logit_softcapping=30.0, **common)
    else:
        raise ModelError(f"unknown tiny architecture '{arch}'; choose one of {', '.join(TINY_ARCHITECTURES)}.")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def save_tiny_model(folder: str | Path, arch: str, tokenizer, **kwargs) -> Path:
    """Build a tiny model and save it with its tokenizer as a normal HF folder (safetensors)."""
    folder = Path(folder)
    model = tiny_causal_lm(arch, tokenizer, **kwargs)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
