"""Sampling responses with the published protocol (spec/evaluation.md), shared by `dskd-pipe score`, `dskd-pipe
generate` and the distill stage's dev evaluation: prompts cut and left-padded, length-sorted batches, one seeded
pass, responses cut at the first EOS; ROUGE-L over the passes.

What a pass depends on: `generate` calls torch.manual_seed(seed) once, then samples the length-sorted batches in a
fixed order, so a pass is a function of (model, prompts, seed, batch_size, device, dtype) (stages/score.py says why
those are in a generations file's fingerprint).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from dskd_pipe.pipeline.config import LITERAL_N, ConfigError, ScoreConfig, option_problems
from dskd_pipe.pipeline.data import Example
from dskd_pipe.pipeline.models import eos_token_id, pad_token_id
from dskd_pipe.pipeline.progress import Console, ProgressLine
from dskd_pipe.pipeline.rouge import rouge_l

NEWLINE_MARKER = "<n>"  # the released data files' escaped newline
LITERAL_N_CHOICES = LITERAL_N  # declared with ScoreConfig.literal_n



def unescape_newlines(examples: list[Example], where: str = "both") -> list[Example]:
    """A literal "<n>" read as a newline: in prompts and references ("both"), in prompts only ("prompts": the released
    evaluation loaders, PromptDataset), or nowhere ("none")."""
    if where not in LITERAL_N_CHOICES:
        raise ConfigError(f"--literal-n '{where}': choose one of {', '.join(LITERAL_N_CHOICES)}.")
    if where == "none":
        return examples
    out = []
    for e in examples:
        refs = tuple(r.replace(NEWLINE_MARKER, "\n") for r in e.references) if where == "both" else e.references
        out.append(replace(e, prompt=e.prompt.replace(NEWLINE_MARKER, "\n"), references=refs))
    return out


def check_generation_settings(cfg: ScoreConfig) -> None:
    """Raise ConfigError listing every generation setting out of range (the declared ranges of pipeline/config.py,
    then what sampling needs)."""
    problems = option_problems(cfg)
    if not cfg.greedy and cfg.temperature <= 0:
        problems.append(f"temperature must be > 0 for sampling, found {cfg.temperature} (use --greedy instead).")
    if not cfg.seeds:
        problems.append("seeds is empty: give at least one --seed.")
    if problems:
        raise ConfigError("\n".join(problems))


def prompt_lengths_over(tokenizer, prompts: list[str], max_prompt_length: int) -> list[bool]:
    """Per prompt: whether it is longer than `max_prompt_length` tokens (and so cut by `tokenize_prompts`)."""
    return [len(ids) > max_prompt_length for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def tokenize_prompts(tokenizer, prompts: list[str], max_prompt_length: int) -> list[list[int]]:
    """Prompt ids without special tokens (no BOS), cut to their first `max_prompt_length` tokens."""
    enc = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [list(ids)[:max_prompt_length] for ids in enc]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, T] and attention mask [B, T]: every prompt ends at the last column, where generation starts."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def decode_response(tokenizer, new_ids: list[int], eos_id: int) -> str:
    """Generated ids -> response text: stop at the first EOS id, skip special tokens, cut at the first EOS text, strip."""
    if eos_id in new_ids:
        new_ids = new_ids[:new_ids.index(eos_id)]
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    eos_text = tokenizer.eos_token
    if eos_text and eos_text in text:  # an EOS spelled out by ordinary tokens
        text = text[:text.index(eos_text)]
    return text.strip()


def _generation_config(cfg: ScoreConfig, eos_id: int, pad_id: int):
    """A fresh GenerationConfig: the model's own generation_config.json (repetition_penalty, top_k=50, ...) must not
    leak into the protocol, and `generate` fills unset values from it."""
    from transformers import GenerationConfig

    common = dict(max_new_tokens=cfg.max_new_tokens, no_repeat_ngram_size=cfg.no_repeat_ngram_size or None,
                  eos_token_id=eos_id, pad_token_id=pad_id, num_beams=1)
    if cfg.greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, **common)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], seed: int, cfg: ScoreConfig, progress: bool | None = None,
             desc: str = "generate", bar: ProgressLine | None = None) -> list[str]:
    """One pass of responses to `prompts`, in their order, with the settings of `cfg` (spec/evaluation.md).

    Prompts are sorted by token length (longest first, so memory runs out early if at all), cut into batches of
    cfg.batch_size, left-padded, and the order is restored. torch.manual_seed(seed) is called once before the first
    batch; see the module docstring for what the samples depend on. Greedy when cfg.greedy (seed unused). The
    caller's RNG state is restored afterwards, so a dev evaluation inside training leaves the training stream as is.
    `bar`: the caller's progress line (a stage's, over all its passes); else this pass draws its own.
    """
    check_generation_settings(replace(cfg, seeds=cfg.seeds or (seed,)))

    eos_id, pad_id = eos_token_id(tokenizer), pad_token_id(tokenizer)
    device = next(model.parameters()).device
    if not prompts:
        return []
    rows = tokenize_prompts(tokenizer, prompts, cfg.max_prompt_length)
    # Stable sort: ties keep input order, so the batches are a function of the prompts alone.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: list[str | None] = [None] * len(rows)
    gen_cfg = _generation_config(cfg, eos_id, pad_id)
    saved_gen_cfg, was_training = model.generation_config, model.training
    model.generation_config = gen_cfg  # generate() fills unset values from the model's config: give it ours
    model.eval()  # the distill stage calls this mid-training: no dropout while sampling
    own_bar = bar is None
    if own_bar:
        bar = Console.for_stage(cfg.progress if progress is None else progress, cfg.quiet).bar(desc, len(rows), "ex")
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)  # seeds CPU and every CUDA device
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                ids, mask = left_pad([rows[i] for i in idx], pad_id)  # [B, T]
                result = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                        generation_config=gen_cfg)
                new = result[:, ids.shape[1]:].tolist()  # [B, <= max_new_tokens]
                for i, r in zip(idx, new):
                    out[i] = decode_response(tokenizer, r, eos_id)
                bar.update(len(idx))
    finally:
        if own_bar:
            bar.close()
        model.generation_config = saved_gen_cfg
        model.train(was_training)
    return out  # type: ignore[return-value]


def evaluate_rouge(model, tokenizer, examples: list[Example], seeds, cfg: ScoreConfig) -> float:
    """Mean ROUGE-L x 100 over `examples`, averaged over one pass per seed (the distill stage's dev metric)."""
    seeds = tuple(seeds) or cfg.seeds
    if cfg.greedy:
        seeds = seeds[:1]
    prompts = [e.prompt for e in examples]
    per_seed = []
    for seed in seeds:
        texts = generate(model, tokenizer, prompts, seed, cfg, desc=f"dev seed {seed}")
        per_seed.append(100.0 * sum(rouge_l(t, e.references) for t, e in zip(texts, examples)) / len(examples))
    return sum(per_seed) / len(per_seed)
