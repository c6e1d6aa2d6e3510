"""The project's losses as functions of tensors: the math is in each docstring, with its reference.

Conventions (every function here): a loss returns a token SUM over the positions it is given (the caller divides
once, e.g. by the batch's supervised student tokens, `(labels != -100).sum()`); labels are already aligned with
the logits (labels[i] is the target of logits[i], -100 where nothing is learnt); full-vocabulary terms run in fp32
and build [rows, V] blocks from hidden states and the head (`TeacherHead`), a bounded number of rows at a time.

From a store: `teacher_hidden(batch)` gives the teacher's states [B, T, dt], `store.head` its head. For example,
ALM and prefix-kd (together the best cross-tokenizer method of the project's benchmark) on a batch of
`store_collate(store, tok, method="alm+prefix-kd")` ("teacher_chunk" / "student_chunk": the chunk of each label):

    vt, vs = store.head.weight.shape[0], student_logits.shape[-1]
    events = next_text_events(store.tokenizer(), tok, 1, vt, vs)                 # once per tokenizer pair
    blank_t, blank_s = blank_mask(store.tokenizer(), vt), blank_mask(tok, vs)
    alm = alm_loss(student_logits, batch["labels"], teacher_hidden(batch), batch["teacher_labels"], store.head,
                   batch["student_chunk"], batch["teacher_chunk"], student_word_start=word_start_mask(tok, vs),
                   teacher_word_start=word_start_mask(store.tokenizer(), vt)).loss     # a mean over chunks
    t_pos, s_pos = shared_boundaries(batch["teacher_chunk"], batch["student_chunk"],
                                     blank_t[batch["teacher_labels"].clamp_min(0)],
                                     blank_s[batch["labels"].clamp_min(0)])
    pkd = prefix_kd_loss(student_logits, teacher_hidden(batch), store.head, t_pos, s_pos, events.teacher,
                         events.student, events.size, tau=2.0).kd                      # a sum over boundaries
    n = (batch["labels"] != -100).sum()
    loss = 0.1 * cross_entropy_sum(student_logits, batch["labels"]) / n + 0.9 * (alm + pkd / n)

and plain KD when both models share a tokenizer:

    zt = teacher_logits(teacher_hidden(batch), store.head)                     # [B, T, V]
    kd = forward_kl(student_logits, zt, batch["labels"] != -100, tau=2.0)
"""
from dskd_pipe.pipeline.alignment import blank_mask, next_text_events, word_start_mask
from dskd_pipe.pipeline.objectives.alm import alm_loss, binary_cross_entropy
from dskd_pipe.pipeline.objectives.balance import balanced_sum, gradmag_weights, last_block_parameters
from dskd_pipe.pipeline.objectives.baselines import mined_loss, mined_token_map, uld_loss
from dskd_pipe.pipeline.objectives.cma_ga import build_discriminator, discriminator_loss, generator_loss
from dskd_pipe.pipeline.objectives.divergences import (DIVERGENCES, adaptive_kl, cross_entropy_sum, forward_kl, js,
                                                       reverse_kl, skewed_forward_kl, skewed_reverse_kl, tvd)
from dskd_pipe.pipeline.objectives.dskd import (TeacherHead, build_projectors, chunked_fkl_over_head,
                                                cross_model_attention, dskd_cma_loss, dskd_same_vocab_loss,
                                                teacher_logits)
from dskd_pipe.pipeline.objectives.dskd_v2 import dskd_v2_eta_loss, dskd_v2_same_vocab_loss, ideal_projector_init
from dskd_pipe.pipeline.objectives.dwa import dwa_kd_loss, normalized_soft_dtw, soft_dtw
from dskd_pipe.pipeline.objectives.prefix_kd import event_log_probs, prefix_kd_loss, shared_boundaries

__all__ = [
    # the teacher's distribution from its hidden states
    "TeacherHead", "teacher_logits",
    # token-level divergences f(student_logits, teacher_logits, mask, tau) and the student's own CE
    "cross_entropy_sum", "forward_kl", "reverse_kl", "skewed_forward_kl", "skewed_reverse_kl", "js", "adaptive_kl",
    "tvd", "DIVERGENCES",
    # across tokenizers
    "alm_loss", "binary_cross_entropy", "word_start_mask", "prefix_kd_loss", "shared_boundaries", "event_log_probs",
    "next_text_events", "blank_mask", "uld_loss", "mined_loss", "mined_token_map",
    # several parts balanced by gradient magnitude (tokenkit's GradMag)
    "gradmag_weights", "balanced_sum", "last_block_parameters",
    # the DSKD family
    "dskd_same_vocab_loss", "dskd_cma_loss", "build_projectors", "cross_model_attention", "chunked_fkl_over_head",
    "dskd_v2_same_vocab_loss", "dskd_v2_eta_loss", "ideal_projector_init", "dwa_kd_loss", "soft_dtw",
    "normalized_soft_dtw", "generator_loss", "discriminator_loss", "build_discriminator",
]
