"""Loading models and tokenizers, the parts of a model the store keeps, and tiny models for tests and the demo.

MODEL arguments are a hub id, a local folder, or a `.gguf` file (converted once into a cached folder by
`pipeline/gguf.py`, which needs the `gguf` extra). `trust_remote_code` is off unless asked for; weights are loaded
from safetensors when the checkpoint has them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

import torch

from dskd_pipe.pipeline.errors import ModelError


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


def _local_or_hub(name_or_path: str) -> tuple[str, dict]:
    """(the folder to load or the hub id as given, extra from_pretrained arguments). A path-like name that does not
    exist fails here at once; a hub id is first asked for once, with a timeout (hub_reachable)."""
    name_or_path = _gguf_folder(str(name_or_path))
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return str(local), {}
    if local.exists():
        raise ModelError(f"{name_or_path}: a file, not a model folder. Pass the folder that holds config.json "
                         "(or a .gguf file, or a hub id).")
    if _path_like(name_or_path):
        raise ModelError(f"{name_or_path}: no such folder. Pass an existing model folder or a hub id "
                         "(owner/name).")
    return name_or_path, ({} if hub_reachable(name_or_path) else {"local_files_only": True})


@functools.lru_cache(maxsize=None)
def hub_reachable(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the hub answers for `repo_id`: one small request with a timeout, a few tries (the limits of
    cache/remote.py, DSKD_PIPE_REMOTE_TIMEOUT / _TRIES). False (use the local copy) when offline mode is on or the
    hub does not answer but the local cache holds the repo; ModelError when it holds nothing, or the hub says the
    repo does not exist. transformers alone retried for about 50 s before failing without a network."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    from dskd_pipe.cache.remote import remote_limits

    if constants.HF_HUB_OFFLINE:
        return False
    timeout, tries = remote_limits()
    url = hf_hub_url(repo_id, "config.json", repo_type=repo_type)
    failure = None
    for attempt in range(tries):
        try:
            get_hf_file_metadata(url, timeout=timeout, retry_on_errors=False)
            return True
        except EntryNotFoundError:  # the repo answers; it has no config.json (a tokenizer or data repo)
            return True
        except GatedRepoError:
            raise ModelError(f"{repo_id}: a gated repo on the hub ({url}). Accept its terms on the hub and log in "
                             "(huggingface-cli login or HF_TOKEN), or pass a local folder.") from None
        except RepositoryNotFoundError:
            raise ModelError(f"{repo_id}: no such {repo_type} on the hub ({url}), or a private one: check the id, "
                             "log in (huggingface-cli login or HF_TOKEN), or pass a local folder.") from None
        except Exception as e:  # no network, a timeout, a proxy: httpx's and the hub client's own error types
            failure = e
            time.sleep(min(2.0 ** attempt, 4.0) if attempt + 1 < tries else 0)
    if try_to_load_from_cache(repo_id, "config.json", repo_type=repo_type) is not None:
        return False  # a copy in the local cache: load it without asking the hub again
    raise ModelError(f"{repo_id}: not a local folder, and the hub did not answer at {url} ({type(failure).__name__}: "
                     f"{_one_line(failure)[:160]}; {tries} tries, {timeout:g} s each). Check the network, a proxy or "
                     "HF_ENDPOINT; or pass a local folder (HF_HUB_OFFLINE=1 uses the local cache only).")


def _one_line(e: BaseException) -> str:
    """A library's (often multi-line) error message as one line."""
    return " ".join(str(e).split())


def _fix(folder: Path) -> str:
    if folder.is_dir():
        return "Check the folder's files."
    return "Check the hub id and the network, or pass a local folder (HF_HUB_OFFLINE=1 uses the local cache only)."


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    name_or_path, hub = _local_or_hub(name_or_path)
    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(f"{name_or_path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); save the "
                         "tokenizer into the model folder (tokenizer.save_pretrained).")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **hub)
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

    name_or_path, hub = _local_or_hub(name_or_path)
    folder = Path(name_or_path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ModelError(f"{name_or_path}: no config.json, so not a model folder (save one with "
                         "model.save_pretrained).")
    device = check_device(device or default_device())
    dtype = dtype or default_dtype(device)
    kwargs = dict(hub)
    if device_map:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ModelError("--device-map needs the `accelerate` package: pip install accelerate") from None
        kwargs["device_map"] = device_map
    from safetensors import SafetensorError

    try:
        model, info = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, output_loading_info=True,
                                                           trust_remote_code=trust_remote_code, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        # a truncated model.safetensors (SafetensorError), weights of other shapes than config.json (RuntimeError)
        raise ModelError(f"{name_or_path}: cannot load a causal LM ({_one_line(e)[:400]}). {_fix(folder)}") from None
    if disagree := _config_disagrees(info):
        raise ModelError(f"{name_or_path}: config.json does not describe the saved weights ({disagree}); the model "
                         "would run with weights made up at random. Use the config.json saved with these weights.")
    return (model if device_map else model.to(device)).eval()


def _config_disagrees(info: dict) -> str:
    """What transformers' loading report says does not fit (weights missing, left over or of another shape), or
    ''. Tied weights and buffers a model rebuilds are not in the report."""
    parts = []
    for key, what in (("missing_keys", "missing from the weights"), ("unexpected_keys", "in the weights, not the "
                      "model"), ("mismatched_keys", "of another shape")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if keys:
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
    return "; ".join(parts)


def check_device(device: str) -> str:
    """`device` if this machine has it; ModelError naming what is missing (a CUDA device without a GPU or a CUDA
    build of torch, cuda:N beyond the GPUs) and the fix."""
    kind = torch.device(device).type if device else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (CUDA_VISIBLE_DEVICES, the driver)")
            raise ModelError(f"--device {device}: {why}. Pass --device cpu, or leave --device out to use a GPU when "
                             "there is one.")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1}.")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"--device {device}: MPS is not available here. Pass --device cpu.")
    return device


def check_vocabulary(model, tokenizer, name: str) -> None:
    """ModelError when the tokenizer can give ids the model has no embedding (or head) row for: its base vocabulary,
    EOS and pad ids must be below the model's rows. Those ids failed deep inside the forward ('index out of range in
    self')."""
    rows = int(model.get_input_embeddings().weight.shape[0])
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        rows = min(rows, int(head.weight.shape[0]))
    needed = {"its vocabulary": int(tokenizer.vocab_size) - 1, "its EOS id": tokenizer.eos_token_id,
              "its pad id": tokenizer.pad_token_id}
    over = {what: i for what, i in needed.items() if i is not None and int(i) >= rows}
    if over:
        what, i = next(iter(over.items()))
        raise ModelError(f"{name}: the tokenizer gives ids up to {i} ({what}, {len(tokenizer)} tokens in all), but the "
                         f"model has {rows} embedding rows. Pass the tokenizer the model was trained with, or resize "
                         "its embeddings (model.resize_token_embeddings(len(tokenizer))) and save it again.")


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
