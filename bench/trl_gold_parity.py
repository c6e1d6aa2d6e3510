"""Same loss, first: our `uld` against TRL GOLD's ULD loss (trl.experimental.gold.ULDLoss) on one batch and models.

Both losses see the same student logits (one forward of the student) and the same teacher (its logits for TRL,
its last hidden state and head for ours, which rebuilds the logits from them as the store does). The batch is
tokenised by TRL's own `build_teacher_inputs_from_texts` for both models (prompt and completion tokenised apart,
no special tokens added by GPT-2 / Qwen, EOS appended): exactly how dskd-pipe builds a sequence
(pipeline/data.py build_sequence), so both sides hold the same token ids.

Conventions that differ and how the comparison removes them (each is listed in the JSON under "differences"):
- labels: TRL's are unshifted (labels[t] = ids[t] on the completion), ours are shifted (labels[t] = ids[t + 1]);
  ours get labels[:, 1:] and logits[:, :-1] of the same forward.
- normalisation: TRL divides each example's L1 sum by its aligned length and averages over the batch; ours returns
  the token sum (the stage divides by the batch's supervised student tokens). We call ours per example and weight
  example i by 1 / (B n_i), which is TRL's reduction; values and gradients are then compared directly.
- TRL's `observed` merge strategy (its default) slices the logits AT the completion tokens, i.e. the distributions
  of the token after each one; `bayesian` slices one earlier (the distributions of the completion tokens, as ULD's
  paper and ours). TRL's default also skips each side's EOS (uld_skip_*_eos), aligns by byte offsets and merges
  split tokens (use_extended_uld); its hybrid loss is off by default. The closest TRL config is therefore
  use_extended_uld=False, uld_token_merge_strategy="bayesian", uld_skip_student_eos=uld_skip_teacher_eos=False,
  uld_crossentropy_weight=0, uld_distillation_weight=1: "closest" below; the other variants are measured against
  ours to name what each default changes.

CPU:  python bench/trl_gold_parity.py            GPU: python bench/trl_gold_parity.py --device cuda
Needs trl (pip install -e ".[bench]"); writes bench/results/trl_gold_parity-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_offline_vs_online import DATA, SHAPES, build_model  # noqa: E402
from results_file import write_result  # noqa: E402

import dskd_pipe as dp  # noqa: E402


def load_texts(limit: int) -> tuple[list[str], list[str]]:
    rows = [json.loads(ln) for ln in DATA.read_text().splitlines()[:limit]]
    return [r["prompt"] for r in rows], [r["output"] for r in rows]


def trl_config(work: Path, **uld):
    from trl.experimental.gold import GOLDConfig

    return GOLDConfig(output_dir=str(work / "gold"), report_to="none", use_uld_loss=True, use_cpu=True, **uld)


CLOSEST = dict(use_extended_uld=False, uld_token_merge_strategy="bayesian", uld_skip_student_eos=False,
               uld_skip_teacher_eos=False, uld_crossentropy_weight=0.0, uld_distillation_weight=1.0,
               uld_use_hybrid_loss=False)
VARIANTS = {
    "closest": CLOSEST,
    # TRL's defaults one at a time on top of the closest config, then all of them (GOLDConfig's own defaults)
    "observed": {**CLOSEST, "uld_token_merge_strategy": "observed"},
    "skip_eos": {**CLOSEST, "uld_skip_student_eos": True, "uld_skip_teacher_eos": True},
    "extended_uld": {**CLOSEST, "use_extended_uld": True},
    "hybrid": {**CLOSEST, "uld_use_hybrid_loss": True},
    "trl_defaults": dict(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0),
}


def sharpen(model, factor: float) -> None:
    """Scale the final norm's output by `factor`, so the logits (and the post-norm last hidden state the store
    keeps) are `factor` times larger: random weights give near-uniform distributions (p ~ 1/V), where a shift of
    one position barely moves a sorted distribution; a trained model's are peaked."""
    base = model.base_model
    norm = getattr(base, "norm", None) or getattr(base, "ln_f")
    with torch.no_grad():
        norm.weight.mul_(factor)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(factor)


def max_diffs(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs()
    return {"max_abs": float(d.max()), "max_rel": float((d / b.abs().clamp_min(1e-12)).max()),
            "max_abs_reference": float(b.abs().max())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-shape", default="tiny-qwen2", choices=sorted(SHAPES))
    p.add_argument("--student-shape", default="tiny-gpt2", choices=sorted(SHAPES))
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--max-chars", type=int, default=400, help="Completions cut to this many characters.")
    p.add_argument("--sharpen", type=float, default=20.0, help="Both models' logits scaled by this (peaked "
                   "distributions, as trained models have; 1 = the random weights' near-uniform ones).")
    p.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated TRL configs to compare.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gold.gold_trainer import ULDLoss, build_teacher_inputs_from_texts

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        t_dir, s_dir = build_model(args.teacher_shape, work / "teacher"), build_model(args.student_shape,
                                                                                     work / "student")
        dev = torch.device(args.device)
        teacher = AutoModelForCausalLM.from_pretrained(t_dir, dtype=torch.float32).to(dev).eval()
        student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32).to(dev).eval()
        sharpen(teacher, args.sharpen)
        sharpen(student, args.sharpen)
        t_tok, s_tok = AutoTokenizer.from_pretrained(t_dir), AutoTokenizer.from_pretrained(s_dir)
        for tok in (t_tok, s_tok):
            tok.pad_token = tok.pad_token or tok.eos_token
        prompts, completions = load_texts(args.examples)
        completions = [c[: args.max_chars] for c in completions]
        s_ids, s_labels, s_mask, s_off = build_teacher_inputs_from_texts(s_tok, prompts, completions)
        t_ids, t_labels, t_mask, t_off = build_teacher_inputs_from_texts(t_tok, prompts, completions)
        s_ids, s_labels, s_mask, s_off = (x.to(dev) for x in (s_ids, s_labels, s_mask, s_off))
        t_ids, t_labels, t_mask, t_off = (x.to(dev) for x in (t_ids, t_labels, t_mask, t_off))

        with torch.no_grad():
            t_out = teacher(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True)
        t_logits, t_hidden = t_out.logits.float(), t_out.hidden_states[-1].float()  # post-norm last state
        head = dp.TeacherHead(weight=teacher.get_output_embeddings().weight.detach())
        rebuilt = dp.losses.teacher_logits(t_hidden, head)
        B = s_ids.shape[0]

        def ours(z_s: torch.Tensor) -> torch.Tensor:
            """Our uld (kd_rate 1: the ULD term alone) per example, reduced as TRL reduces."""
            total = z_s.new_zeros(())
            for i in range(B):
                lab, t_lab = s_labels[i:i + 1, 1:], t_labels[i:i + 1, 1:]
                n = min(int((lab != -100).sum()), int((t_lab != -100).sum()))
                out = dp.losses.uld_loss(z_s[i:i + 1, :-1], lab, t_hidden[i:i + 1, :-1], t_lab, head, kd_rate=1.0)
                total = total + out.kd / (B * n)
            return total

        def trl_loss(z_s: torch.Tensor, variant: dict) -> torch.Tensor:
            fn = ULDLoss(trl_config(work, **variant), student_tokenizer=s_tok, teacher_tokenizer=t_tok, device=dev)
            return fn(student_logits=z_s, teacher_logits=t_logits, student_labels=s_labels,
                      teacher_labels=t_labels, student_input_ids=s_ids, teacher_input_ids=t_ids,
                      student_byte_offsets=s_off, teacher_byte_offsets=t_off)

        def value_and_grads(loss_fn) -> tuple[float, torch.Tensor, torch.Tensor]:
            student.zero_grad(set_to_none=True)
            logits = student(input_ids=s_ids, attention_mask=s_mask).logits.float()
            logits.retain_grad()
            loss = loss_fn(logits)
            loss.backward()
            params = torch.cat([q.grad.flatten() for q in student.parameters() if q.grad is not None])
            return float(loss), logits.grad.detach().clone(), params.detach().clone()

        ours_v, ours_gz, ours_gp = value_and_grads(ours)
        variants = {}
        for name in args.variants.split(","):
            variant = VARIANTS[name]
            v, gz, gp = value_and_grads(lambda z, variant=variant: trl_loss(z, variant))
            variants[name] = {"config": variant, "trl_value": v, "ours_value": ours_v,
                              "value_abs_diff": abs(v - ours_v), "value_rel_diff": abs(v - ours_v) / abs(v),
                              "grad_logits": max_diffs(ours_gz, gz), "grad_params": max_diffs(ours_gp, gp)}
            print(f"{name}: trl {v:.6f} ours {ours_v:.6f} grad logits max abs "
                  f"{variants[name]['grad_logits']['max_abs']:.3g}", file=sys.stderr)
        n_s = [int((s_labels[i] != -100).sum()) for i in range(B)]
        n_t = [int((t_labels[i] != -100).sum()) for i in range(B)]
    import transformers

    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"cpu, {torch.get_num_threads()} threads")
    closest = variants["closest"]
    result = {
        "device": device, "args": vars(args),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "dskd_pipe": dp.__version__},
        "batch": {"examples": B, "student_completion_tokens": n_s, "teacher_completion_tokens": n_t,
                  "student_vocab": int(s_tok.vocab_size), "teacher_vocab": int(t_logits.shape[-1])},
        "teacher_logits_rebuilt_from_head": max_diffs(rebuilt, t_logits),
        "closest_equal": closest["value_rel_diff"] < 1e-5 and closest["grad_logits"]["max_abs"]
        <= 1e-5 * closest["grad_logits"]["max_abs_reference"],
        "variants": variants,
        "differences": {
            "labels": "TRL's are unshifted, ours shifted by one (labels[t] is the target of logits[t]); removed by "
                      "comparing on one forward with ours given logits[:, :-1] and labels[:, 1:].",
            "reduction": "TRL: sum_v |.| per example / aligned length, mean over the batch, times "
                         "uld_distillation_weight; ours: the token sum (the stage divides by the step's supervised "
                         "student tokens, so long examples weigh more). Removed by weighting ours per example.",
            "cross_entropy": "TRL adds uld_crossentropy_weight * mean CE (default weight 0: no CE at all); ours "
                             "(1 - kd_rate) * CE_sum + kd_rate * ULD_sum, kd_rate 0.5. Set to the ULD term alone.",
            "observed": "TRL's default merge strategy compares the distributions at the completion tokens, i.e. "
                        "of the NEXT token (the last one past EOS), not of the completion tokens; 'bayesian' is "
                        "the ULD paper's and ours.",
            "skip_eos": "TRL's default drops the last completion position on each side (the EOS prediction).",
            "extended_uld": "TRL's default pairs byte-offset groups and multiplies split-token probabilities in "
                            "(unnormalised merged rows); ULD's paper and ours pair the k-th completion token of "
                            "each side, cut to the shorter.",
            "hybrid": "off by default in TRL; when on, tokens with the same string in both vocabularies are "
                      "compared directly (JSD, beta) and only the rest sorted.",
            "teacher_logits": "ours rebuilds the teacher's logits from its last hidden state and head (the "
                              "store's path); TRL takes the model's logits. The difference is matmul rounding "
                              "(teacher_logits_rebuilt_from_head).",
        },
    }
    write_result(args.out, f"trl_gold_parity-{args.device.split(':')[0]}", result)
    return result


if __name__ == "__main__":
    main()
