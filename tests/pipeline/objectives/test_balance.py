"""GradMag balancing (pipeline/objectives/balance.py): weights are the inverse gradient norms on the last block,
the balanced sum moves the last block equally for every part, and a part with no gradient gets weight 0."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dskd_pipe.pipeline.objectives.balance import balanced_sum, gradmag_weights, last_block_parameters


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def test_last_block_is_the_last_decoder_layer():
    model = _model()
    params = last_block_parameters(model)
    assert {id(p) for p in params} == {id(p) for p in model.model.layers[2].parameters()}


def test_weights_are_inverse_norms_and_balance_the_parts():
    model = _model()
    ids = torch.randint(0, 32, (2, 6))
    logits = model(ids).logits
    a = logits[..., :16].pow(2).sum() * 10.0  # a large part
    b = logits[..., 16:].sum() * 0.01  # a small one
    params = last_block_parameters(model)
    w = gradmag_weights([a, b], params)
    for part, weight in zip((a, b), w):
        grads = torch.autograd.grad(part, params, retain_graph=True)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        torch.testing.assert_close(weight, 1.0 / norm)
    total = balanced_sum([a, b], w)
    # each part's share moves the last block by the same norm: w_i ||g_i|| / sum w = 1 / sum w
    for part, weight in zip((a, b), w):
        grads = torch.autograd.grad(weight / w.sum() * part, params, retain_graph=True)
        torch.testing.assert_close(torch.sqrt(sum(g.pow(2).sum() for g in grads)), 1.0 / w.sum())
    # the total is a weighted mean of the parts (keeps their scale), and its gradient reaches every block
    assert min(a, b) <= total <= max(a, b)
    total.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_a_part_without_gradient_gets_weight_zero():
    model = _model()
    logits = model(torch.randint(0, 32, (1, 4))).logits
    ce = logits.logsumexp(-1).sum()
    empty = logits.sum() * 0.0 + torch.tensor(0.0)  # no chunk in the micro-batch: zero gradient
    w = gradmag_weights([ce, empty, torch.tensor(3.0)], last_block_parameters(model))
    assert w[0] > 0 and w[1] == 0 and w[2] == 0
    torch.testing.assert_close(balanced_sum([ce, empty, torch.tensor(3.0)], w), ce)
