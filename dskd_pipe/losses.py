"""The project's losses as functions of tensors: the math is in each docstring, with its reference.

Conventions (every function here): a loss returns a token SUM over the positions it is given (the caller divides
once, e.g. by the batch's supervised student tokens, `(labels != -100).sum()`); labels are already aligned with
the logits (labels[i] is the target of logits[i], -100 where nothing is learnt); full-vocabulary terms run in fp32
and build [rows, V] blocks from hidden states and the head (`TeacherHead`), a bounded number of rows at a time.

From a store: `teacher_hidden(batch)` gives the teacher's states [B, T, dt], `store.head` its head. For example,
ALM (the cross-tokenizer method that beat sft in the project's benchmark) on a batch of
`store_collate(store, tok, method="alm")`:

    out = chunk_likelihood_loss(student_logits, batch["labels"], teacher_hidden(batch), batch["teacher_labels"],
                                store.head, batch["chunks"], kd_rate=0.5, tau=1.0)
    loss = out.loss / (batch["labels"] != -100).sum()

and plain KD when both models share a tokenizer:

    zt = teacher_logits(teacher_hidden(batch), store.head)                     # [B, T, V]
    kd = forward_kl(student_logits, zt, batch["labels"] != -100, tau=2.0)
"""
from dskd_pipe.pipeline.objectives.alm import chunk_likelihood_loss, gold_log_probs
from dskd_pipe.pipeline.objectives.baselines import mined_loss, mined_token_map, uld_loss
from dskd_pipe.pipeline.objectives.cma_ga import build_discriminator, discriminator_loss, generator_loss
from dskd_pipe.pipeline.objectives.divergences import (DIVERGENCES, adaptive_kl, cross_entropy_sum, forward_kl, js,
                                                       reverse_kl, skewed_forward_kl, skewed_reverse_kl, tvd)
from dskd_pipe.pipeline.objectives.dskd import (TeacherHead, build_projectors, chunked_fkl_over_head,
                                                cross_model_attention, dskd_cma_loss, dskd_same_vocab_loss,
                                                teacher_logits)
from dskd_pipe.pipeline.objectives.dskd_v2 import dskd_v2_eta_loss, dskd_v2_same_vocab_loss, ideal_projector_init
from dskd_pipe.pipeline.objectives.dwa import dwa_kd_loss, normalized_soft_dtw, soft_dtw

__all__ = [
    # the teacher's distribution from its hidden states
    "TeacherHead", "teacher_logits",
    # token-level divergences f(student_logits, teacher_logits, mask, tau) and the student's own CE
    "cross_entropy_sum", "forward_kl", "reverse_kl", "skewed_forward_kl", "skewed_reverse_kl", "js", "adaptive_kl",
    "tvd", "DIVERGENCES",
    # across tokenizers
    "chunk_likelihood_loss", "gold_log_probs", "uld_loss", "mined_loss", "mined_token_map",
    # the DSKD family
    "dskd_same_vocab_loss", "dskd_cma_loss", "build_projectors", "cross_model_attention", "chunked_fkl_over_head",
    "dskd_v2_same_vocab_loss", "dskd_v2_eta_loss", "ideal_projector_init", "dwa_kd_loss", "soft_dtw",
    "normalized_soft_dtw", "generator_loss", "discriminator_loss", "build_discriminator",
]
