"""Balancing the parts of a loss by their gradient magnitude (GradMag; tokenkit's multitask aggregation
"approx_gradmag_preserve_mag", used in its cross-tokenizer examples for SFT + ALM; arXiv 2503.20083).

For parts L_1..L_n (each a scalar of one micro-batch), g_i = the gradient of L_i on the parameters of the
student's last transformer block (tokenkit's cheap stand-in for the whole model's gradient), and

    w_i = 1 / ||g_i||  (detached),     L = sum_i w_i L_i / sum_i w_i

so every part moves the last block by the same amount, and the total keeps the scale of the parts (a weighted
mean). Weights set on the parts beforehand cancel out, as tokenkit notes. A part with no gradient there (no
chunks in the micro-batch) gets weight 0 instead of 1/0.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

BLOCK_LISTS = ("layers", "h", "blocks", "block", "layer")  # the ModuleList of transformer blocks in HF models


def last_block_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the model's last transformer block (the last entry of its longest ModuleList
    named like HF's block lists: model.layers, transformer.h, ...); the output head when none is found."""
    best: nn.ModuleList | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS and len(module) > 0:
            if best is None or len(module) > len(best):
                best = module
    source = best[-1] if best is not None else model.get_output_embeddings()
    params = [p for p in source.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__}: the last block has no trainable parameter; --loss-balance "
                         "gradmag needs one (with LoRA, target a module of the last block).")
    return params


def gradmag_weights(parts: list[Tensor], params: list[nn.Parameter]) -> Tensor:
    """w_i = 1 / ||d parts_i / d params|| (detached, fp32) [n]; 0 for a part with no gradient on `params`."""
    norms = []
    for part in parts:
        if not part.requires_grad:
            norms.append(torch.zeros((), device=part.device))
            continue
        grads = torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
        sq = [g.float().pow(2).sum() for g in grads if g is not None]
        norms.append(torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=part.device))
    norms = torch.stack(norms).detach()
    return torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))


def balanced_sum(parts: list[Tensor], weights: Tensor) -> Tensor:
    """sum_i w_i parts_i / sum_i w_i; the plain sum when every weight is 0."""
    total = weights.sum()
    if not total > 0:
        return torch.stack([p.float() for p in parts]).sum()
    return sum(w * p for w, p in zip(weights / total, parts))
