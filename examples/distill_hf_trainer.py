"""Distil a student from a teacher-state store with Hugging Face's `Trainer`: the batches carry the teacher (its
hidden states and token alignment), and `compute_loss` applies the project's ALM loss to them; SFT through the same
Trainer from the same start for comparison. Prints both held-out losses.

    dskd-pipe cache-teacher --teacher Qwen/Qwen1.5-1.8B --data dolly/train.jsonl --out runs/qwen-dolly.zarr
    python examples/distill_hf_trainer.py --store runs/qwen-dolly.zarr --student gpt2 --output_dir runs/trainer \
        --max_steps 500 --learning_rate 5e-4 --per_device_train_batch_size 8

Every other flag is a TrainingArguments one (optimizer, schedule, precision, gradient accumulation, several GPUs
under accelerate or torchrun, checkpoints, report_to); the students land in OUTPUT_DIR/sft and OUTPUT_DIR/alm. The
last --holdout examples of the store are kept out of training and scored (cross-entropy per supervised token).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments

import dskd_pipe as dp


class StoreTrainer(Trainer):
    """A Trainer whose loss reads the teacher from the batch (dskd_pipe.store_collate with method="alm")."""

    def __init__(self, *args, store, kd_rate: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.store, self.kd_rate = store, kd_rate
        # which tokens start a word, per vocabulary: ALM's debiasing (tokenkit's space masks)
        self.word_start_t = dp.losses.word_start_mask(store.tokenizer(), store.head.weight.shape[0])
        self.word_start_s = dp.losses.word_start_mask(self.processing_class,
                                                      self.model.get_output_embeddings().weight.shape[0])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits  # [B, S, Vs]
        labels = inputs["labels"]  # already aligned with the logits (no shift): -100 outside the response
        ce = dp.losses.cross_entropy_sum(logits, labels) / (labels != -100).sum().clamp_min(1)  # per student token
        alm = dp.losses.alm_loss(logits, labels, dp.teacher_hidden(inputs), inputs["teacher_labels"], self.store.head,
                                 inputs["student_chunk"], inputs["teacher_chunk"],
                                 student_word_start=self.word_start_s.to(logits.device),
                                 teacher_word_start=self.word_start_t.to(logits.device)).loss  # a mean over chunks
        loss = (1.0 - self.kd_rate) * ce + self.kd_rate * alm
        return (loss, {"logits": logits}) if return_outputs else loss


@dataclass
class Options:
    store: str = field(metadata={"help": "a teacher-state store (folder or fsspec URL)"})
    student: str = field(metadata={"help": "the student to start from (hub id or folder)"})
    kd_rate: float = field(default=0.5, metadata={"help": "lambda in (1 - lambda) CE + lambda ALM"})
    holdout: int = field(default=100, metadata={"help": "the store's last N examples: scored, not trained"})


def main(argv: list[str] | None = None) -> dict[str, float]:
    """--store and --student, then any TrainingArguments flag (--output_dir, --max_steps, --learning_rate, ...)."""
    options, settings = HfArgumentParser((Options, TrainingArguments)).parse_args_into_dataclasses(argv)
    settings.remove_unused_columns = False  # the teacher's columns are no inputs of the model, but the loss's
    store = dp.open_store(options.store, device=settings.device)  # the head goes where the Trainer puts the model
    tokenizer = AutoTokenizer.from_pretrained(options.student)
    n_train = len(store) - options.holdout
    collate = dp.store_collate(store, tokenizer, method="alm")  # + the chunk of every label on both sides
    held_out = DataLoader(dp.StoreDataset(store, tokenizer, indices=range(n_train, len(store))),
                          batch_size=settings.per_device_eval_batch_size, collate_fn=collate)

    losses, out = {}, settings.output_dir
    for name, kd_rate in (("sft", 0.0), ("alm", options.kd_rate)):  # ALM with kd_rate 0 is the student's own CE
        settings.output_dir = f"{out}/{name}"
        trainer = StoreTrainer(model=AutoModelForCausalLM.from_pretrained(options.student), args=settings,
                               train_dataset=dp.StoreDataset(store, tokenizer, indices=range(n_train)),
                               data_collator=collate, processing_class=tokenizer, store=store, kd_rate=kd_rate)
        trainer.train()
        trainer.save_model()
        losses[name] = dp.held_out_loss(trainer.model, held_out)
    print(f"held-out loss (nats per student token, {len(held_out.dataset)} examples): "
          f"sft {losses['sft']:.4f}  alm {losses['alm']:.4f}")
    return losses


if __name__ == "__main__":
    main()
