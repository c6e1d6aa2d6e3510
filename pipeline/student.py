"""The student side of a distill run: the trainable student (LoRA through peft), its forward as the losses need it
(last hidden states and logits), and writing it as a normal Hugging Face folder with the method's trained parts."""
from __future__ import annotations

from pathlib import Path

import torch

from dskd_pipe.pipeline.config import ConfigError, DistillConfig
from dskd_pipe.pipeline.distributed import Processes
from dskd_pipe.pipeline.models import last_hidden_state, load_causal_lm, logit_transform
from dskd_pipe.pipeline.training import save_safetensors


def build_student(cfg: DistillConfig, device: str):
    """The trainable student (fp32 master weights) from --student; LoRA through peft when lora_rank > 0. A resumed
    run loads its trained weights from the checkpoint afterwards."""
    model = load_causal_lm(cfg.student, dtype=torch.float32, device=device, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora_rank:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("--lora-rank needs the `peft` package: pip install peft") from None
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    model.train()
    return model


def hf_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def student_forward(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hs [B, S, ds] post-final-norm, Zs [B, S, Vs]) of the student; the head applied to Hs as the model does."""
    hf = hf_model(model)
    hidden = last_hidden_state(hf, batch["input_ids"], batch["attention_mask"])  # [B, S, ds]
    logits = hf.get_output_embeddings()(hidden)  # [B, S, Vs]
    scale, cap = logit_transform(hf)
    if scale != 1.0:
        logits = logits * scale
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return hidden, logits


def save_student(student, tokenizer, folder: Path) -> None:
    """A normal HF folder; a LoRA student is merged into its base first."""
    model = student
    if hasattr(student, "merge_and_unload"):
        import copy

        model = copy.deepcopy(student).merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_outputs(trainee: torch.nn.Module, procs: Processes, cfg: DistillConfig, tokenizer, folder: Path,
                 parts: bool = True, student: bool = True) -> None:
    """Rank 0 writes `folder`: with `student`, the student as an HF folder (safetensors, LoRA merged) and its
    tokenizer; with `parts`, each trained part of the method as NAME.safetensors. Every process calls it: under
    FSDP2 the full weights are gathered to rank 0 first, loaded there into a fresh student on the CPU."""
    if procs.engine != "fsdp":
        if procs.main and student:
            save_student(trainee.student, tokenizer, folder)
        if procs.main:
            for name in ("projectors", "discriminator"):
                if parts and getattr(trainee, name) is not None:
                    save_safetensors(getattr(trainee, name), folder / f"{name}.safetensors")
        return
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainee, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not procs.main:
        return
    if student:
        model = build_student(cfg, "cpu")
        model.load_state_dict({k[len("student."):]: v for k, v in full.items() if k.startswith("student.")})
        save_student(model, tokenizer, folder)
    for name in ("projectors", "discriminator"):
        part = {k[len(name) + 1:]: v.contiguous() for k, v in full.items() if k.startswith(name + ".")}
        if parts and part:
            save_file(part, str(folder / f"{name}.safetensors"))
