"""DSKD-CMA-GA: key-query matching by adversarial learning (spec/cma_ga.md).

Ref: Tsiapali, Do, Knill, ICASSP 2026, arXiv 2603.22056. Two modes (--ga-mode):

"paper" (default): the method as the paper describes it, so that the queries are actually matched to the keys.
Per micro-batch, from dskd_cma_loss: keys K [B,T,2dt] (no parameters) and queries Q = query(Qin) [B,S,2dt].
1. Kr = K[mt], Qr = Q[ms] (response positions only; prompt/pad positions share the id-0 embedding).
2. D: per-token discriminator, fp32 (build_discriminator), with its own optimizer.
3. L_D = BCE(D(Kr.detach()), 1) + BCE(D(Qr.detach()), 0), each a mean; steps D only.
4. L_G = BCE(D(Qr), 1), a mean over student response tokens; gradient into the queries only, D not stepped.
5. Student-side total: L = L_DSKD-CMA + lambda_GA * L_G * n_s, where n_s is the micro-batch's supervised
   student token count, so that after the stage's division by the step's supervised student tokens L_G is a
   per-token mean on the same scale as CE (see generator_term).
D always runs in fp32 with autocast off (its step and its use in L_G), whatever the models' precision.

"released": the released DSKD-KQ code (dual_space_kd_with_cma_plus_kq_matching.py, adversarial type "gan"),
reproduced exactly (released_kq_term). Its CMA function returns (..., queries, keys) but the caller unpacks
(..., keys, queries), so the QUERIES enter as the "real" class, behind a gradient-reversal layer:
    L_KQ = BCE(D(GRL(Q)), 1) + BCE(D(K), 0),
each a mean over EVERY position of the padded batch (prompt and pad positions included, B*S and B*T of them).
The query projector does get a gradient, -dBCE(D(Q), 1)/dW_q (it is pushed to make D call the queries "fake",
like the keys), but D is given to no optimizer: it keeps its random initialisation for the whole run, so the
queries are pushed against a fixed random function, not matched to the keys. The term is added to the loss as
kq_rate * L_KQ before the release's division by its per-micro-batch token denominator, i.e. unscaled in the
micro-batch SUM here (no n_s factor). Use it to compare with the published numbers on the same run.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from dskd_pipe.pipeline.config import GA_MODES
from dskd_pipe.pipeline.objectives.dskd import fp32_region


GENERATOR_MODES = ("non_saturating", "gradient_reversal")


class HighwayGate(nn.Module):
    """x' = sigmoid(h) * relu(h) + (1 - sigmoid(h)) * x, h = Linear(d, d)(x) (the paper code's input gate)."""

    def __init__(self, dim: int, spectral_norm: bool = False):
        super().__init__()
        self.proj = _maybe_sn(nn.Linear(dim, dim), spectral_norm)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)  # [N, d]
        gate = torch.sigmoid(h)
        return gate * F.relu(h) + (1.0 - gate) * x


def _maybe_sn(layer: nn.Linear, spectral_norm: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer


def build_discriminator(dim: int, hidden: int = 768, dropout: float = 0.1, spectral_norm: bool = False) -> nn.Module:
    """Per-token discriminator D: R^dim -> logit, fp32.

    D(x) = Linear(hidden, 1)(LeakyReLU_0.1(Linear(dim, hidden)(Dropout_p(highway(x))))); dim = 2dt.
    Returns logits (BCE-with-logits is applied by the losses). spectral_norm wraps every Linear (option, off).
    """
    return nn.Sequential(
        HighwayGate(dim, spectral_norm),
        nn.Dropout(dropout),
        _maybe_sn(nn.Linear(dim, hidden), spectral_norm),
        nn.LeakyReLU(0.1),
        _maybe_sn(nn.Linear(hidden, 1), spectral_norm),
    ).float()


def response_tokens(keys: Tensor, queries: Tensor, teacher_mask: Tensor, student_mask: Tensor):
    """Kr = K[mt] [Nt, 2dt], Qr = Q[ms] [Ns, 2dt] (step 1). K [B,T,2dt], Q [B,S,2dt], mt [B,T], ms [B,S]."""
    return keys[teacher_mask.bool()], queries[student_mask.bool()]


def _prepare(x: Tensor, normalize_directions: bool) -> Tensor:
    """fp32 tokens; with normalize_directions each token is L2-normalised (match directions only)."""
    x = x.float()
    return F.normalize(x, dim=-1) if normalize_directions else x


def _logits(disc: nn.Module, x: Tensor) -> Tensor:
    return disc(x).squeeze(-1)  # [N]


def discriminator_loss(disc: nn.Module, keys_r: Tensor, queries_r: Tensor, normalize_directions: bool = False,
                       counts: tuple[Tensor | float, Tensor | float] | None = None) -> Tensor:
    """L_D = BCE(D(Kr), 1) + BCE(D(Qr), 0), each a mean over its tokens (step 3).

    Both inputs are detached here, so L_D trains D only. Shapes: Kr [Nt, 2dt], Qr [Ns, 2dt].
    counts = (n_real, n_fake): divide the two BCE sums by these token counts instead of Nt and Ns. With the counts
    of a whole optimizer step (all micro-batches and processes), the micro-batches' L_D add up to the L_D of the
    step's batch, whatever its split.
    """
    with fp32_region(keys_r.device):  # D's step is fp32 under any autocast (spec/cma_ga.md step 2)
        real = _logits(disc, _prepare(keys_r.detach(), normalize_directions))  # [Nt]
        fake = _logits(disc, _prepare(queries_r.detach(), normalize_directions))  # [Ns]
        if counts is None:
            return _bce_mean(real, 1.0) + _bce_mean(fake, 0.0)
        n_real, n_fake = counts
        return _bce_sum(real, 1.0) / n_real + _bce_sum(fake, 0.0) / n_fake


def _bce_mean(logits: Tensor, target: float) -> Tensor:
    """BCE-with-logits against a constant label, mean over tokens (0 when there are no tokens)."""
    if logits.numel() == 0:
        return logits.sum()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _bce_sum(logits: Tensor, target: float) -> Tensor:
    """BCE-with-logits against a constant label, summed over tokens."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="sum")


class _GradientReversal(torch.autograd.Function):
    """Identity forward, negated gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def _frozen_call(disc: nn.Module, x: Tensor) -> Tensor:
    """D(x) with D's parameters detached: gradient reaches x, never D's parameters (they get no .grad)."""
    params = {name: p.detach() for name, p in disc.named_parameters()}
    return functional_call(disc, params, (x,)).squeeze(-1)


def generator_loss(
    disc: nn.Module, queries_r: Tensor, mode: str = "non_saturating", normalize_directions: bool = False
) -> Tensor:
    """Generator term for the query projector (step 4), a mean over student response tokens.

    non_saturating:    L_G = BCE(D(Qr), 1) = mean -log sigmoid(D(Qr)).
    gradient_reversal: L_G = BCE(D(GRL(Qr)), 0); the value is D's fake loss, the gradient w.r.t. Qr is its
                       negation (minimax: the queries ascend D's loss).
    Gradient flows into Qr (hence the query projector) only; D's parameters receive none.
    """
    if mode not in GENERATOR_MODES:
        raise ValueError(f"unknown generator mode {mode!r}; expected one of: {', '.join(GENERATOR_MODES)}")
    with fp32_region(queries_r.device):
        q = _prepare(queries_r, normalize_directions)  # [Ns, 2dt]
        if mode == "non_saturating":
            return _bce_mean(_frozen_call(disc, q), 1.0)
        return _bce_mean(_frozen_call(disc, _GradientReversal.apply(q)), 0.0)


def generator_term(l_g: Tensor, n_student_tokens, lambda_ga: float = 0.1) -> Tensor:
    """Step 5: the amount added to the micro-batch's student-side loss SUM: lambda_GA * L_G * n_s.

    n_s = supervised student tokens of the micro-batch; the stage's division by the step's supervised
    student tokens then leaves lambda_GA * L_G as a per-token mean, on the same scale as CE.
    """
    return lambda_ga * l_g * n_student_tokens


def released_kq_term(disc: nn.Module, queries: Tensor, keys: Tensor, lambda_ga: float = 1.0) -> tuple[Tensor, Tensor]:
    """--ga-mode released: (amount added to the micro-batch's student-side SUM, L_KQ), as the released DSKD-KQ code.

    L_KQ = BCE(D(GRL(Q)), 1) + BCE(D(K), 0), each a mean over EVERY position of the padded tensors (Q [B,S,2dt],
    K [B,T,2dt]; prompt and pad positions included). GRL is the identity forward and negates the gradient, so the
    queries (hence the query projector) receive -lambda_GA dBCE(D(Q), 1)/dQ; K has no parameters. D is used as
    is (fixed: never stepped; no gradient reaches its parameters here), in its current train/eval mode (the
    release keeps dropout on while training), in fp32. The amount is lambda_GA * L_KQ, NOT multiplied by n_s:
    the release adds kq_rate * L_KQ to a micro-batch loss that its token denominator then divides, which is
    this SUM divided by the step's supervised tokens (module docstring).
    """
    with fp32_region(queries.device):
        q = _GradientReversal.apply(queries.float()).reshape(-1, queries.shape[-1])  # [B*S, 2dt]
        k = keys.detach().float().reshape(-1, keys.shape[-1])  # [B*T, 2dt]
        l_kq = _bce_mean(_frozen_call(disc, q), 1.0) + _bce_mean(_frozen_call(disc, k), 0.0)
    return lambda_ga * l_kq, l_kq


def reachable_keys(keys_r: Tensor, query: nn.Linear) -> Tensor:
    """Each key projected onto the set the query projector can produce, {W x + b}: b + W W^+ (k - b), with W^+ the
    pseudo-inverse of W [2dt, 2ds] (W and b detached: the projection only chooses what D is shown).

    With 2ds < 2dt the queries fill a 2ds-dimensional affine subspace of the keys' space; a D shown whole keys can
    separate the two along the directions no query reaches, whatever the generator does (BENCHMARKS.md "Why the
    discriminator wins"). Shown these keys, D must tell them apart where the queries can move. With 2ds >= 2dt
    (a full-rank W) the keys come back unchanged.
    """
    weight, bias = query.weight.detach(), query.bias.detach()
    if hasattr(weight, "full_tensor"):  # FSDP2 shards the projectors: the whole matrix, on every process
        weight, bias = weight.full_tensor(), bias.full_tensor()
    weight, bias = weight.float(), bias.float()
    with fp32_region(keys_r.device):
        coords = (keys_r.detach().float() - bias) @ torch.linalg.pinv(weight).T  # [Nt, 2ds]: never a [2dt, 2dt]
        return coords @ weight.T + bias


@torch.no_grad()
def discriminator_accuracy(
    disc: nn.Module, keys_r: Tensor, queries_r: Tensor, normalize_directions: bool = False
) -> tuple[Tensor, Tensor]:
    """(acc_real, acc_fake): share of keys with D(k) > 0 and of queries with D(q) < 0, dropout off.

    Healthy training keeps both roughly in 0.5-0.7 (spec/cma_ga.md step 7). NaN when a side has no tokens.
    """
    was_training = disc.training
    disc.eval()
    try:
        with fp32_region(keys_r.device):
            real = _logits(disc, _prepare(keys_r, normalize_directions))
            fake = _logits(disc, _prepare(queries_r, normalize_directions))
    finally:
        disc.train(was_training)
    return (real > 0).float().mean(), (fake < 0).float().mean()


def build_discriminator_optimizer(
    disc: nn.Module, lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.999), weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """D's own optimizer (Adam betas (0.5, 0.999), lr 1e-4 by default, spec/cma_ga.md step 2)."""
    return torch.optim.AdamW(disc.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)


__all__ = [
    "GA_MODES",
    "GENERATOR_MODES",
    "HighwayGate",
    "build_discriminator",
    "build_discriminator_optimizer",
    "discriminator_accuracy",
    "discriminator_loss",
    "generator_loss",
    "generator_term",
    "reachable_keys",
    "released_kq_term",
    "response_tokens",
]
