"""pipeline/methods.py: one entry per method, the published defaults, the parts each entry builds."""
from types import SimpleNamespace

import pytest
import torch

from dskd_pipe.pipeline.config import DistillConfig
from dskd_pipe.pipeline.methods import METHODS, MethodParts, build_parts, get_method, resolve
from dskd_pipe.pipeline.objectives.dskd import TeacherHead


class _Student(torch.nn.Module):
    """What build_parts reads of a transformers model: its input embeddings and LM head."""

    def __init__(self, vocab=11, ds=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, ds)
        self.head = torch.nn.Linear(ds, vocab, bias=False)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_every_entry_names_itself_and_has_a_loss_and_metrics():
    assert list(METHODS)[:5] == ["sft", "kd", "dskd", "dskd-cma", "cma-ga"]
    for name, m in METHODS.items():
        assert m.name == name and callable(m.loss) and callable(m.metrics) and m.summary
    assert [n for n, m in METHODS.items() if m.same_vocabulary] == ["kd", "dskd", "dskd-v2"]
    assert [n for n, m in METHODS.items() if not m.uses_teacher] == ["sft"]
    with pytest.raises(KeyError, match="unknown method 'nope'; choose one of sft, kd"):
        get_method("nope")


def test_unset_options_take_the_method_default_and_set_ones_stay():
    assert DistillConfig().projector_lr is None
    assert resolve(DistillConfig(method="cma-ga")).projector_lr == 1e-3
    assert resolve(DistillConfig(method="sft")).projector_lr == 1e-3  # concrete even where unused
    assert resolve(DistillConfig(method="dskd-cma", projector_lr=3e-3)).projector_lr == 3e-3
    cfg = resolve(DistillConfig(method="dwa-kd"))
    assert resolve(cfg) is cfg  # nothing left to fill


@pytest.mark.parametrize("name,has_projectors,has_disc", [("sft", False, False), ("kd", False, False),
                                                          ("uld", False, False), ("dskd", True, False),
                                                          ("dskd-cma", True, False), ("cma-ga", True, True),
                                                          ("dwa-kd", True, False), ("dskd-v2", True, False),
                                                          ("chunk-attention", True, False),
                                                          ("chunk-projection", True, False)])
def test_parts_of_each_method(name, has_projectors, has_disc):
    """Projectors map the student's width (6) and the teacher's (4); CMA-GA's discriminator reads [K; Q] (2 dt)
    and has its own optimizer over exactly its parameters."""
    teacher = SimpleNamespace(head=TeacherHead(torch.randn(11, 4)), tokenizer=None)
    cfg = resolve(DistillConfig(method=name, disc_lr=3e-4))
    parts = build_parts(cfg, teacher, None, _Student(), "cpu")
    assert isinstance(parts, MethodParts) and parts.token_map is None
    assert (parts.projectors is not None) == has_projectors
    assert (parts.discriminator is not None) == has_disc == (parts.disc_optimizer is not None)
    if has_projectors:
        shapes = {tuple(p.shape) for p in parts.projectors.parameters()}
        assert shapes and all(set(s) <= {4, 6, 8, 12} for s in shapes), shapes
    if has_disc:
        assert parts.discriminator(torch.randn(3, 8)).shape == (3, 1)
        (group,) = parts.disc_optimizer.param_groups
        assert group["lr"] == 3e-4 and len(group["params"]) == len(list(parts.discriminator.parameters()))


def test_query_projector_only_for_the_attention_methods():
    teacher = SimpleNamespace(head=TeacherHead(torch.randn(11, 4)), tokenizer=None)
    names = {n: {k for k, _ in build_parts(resolve(DistillConfig(method=n)), teacher, None, _Student(),
                                           "cpu").projectors.named_parameters()}
             for n in ("dskd", "dskd-cma", "cma-ga", "chunk-attention", "chunk-projection")}
    assert all(any(k.startswith("query") for k in names[n]) for n in ("dskd-cma", "cma-ga", "chunk-attention"))
    assert not any(k.startswith("query") for n in ("dskd", "chunk-projection") for k in names[n])
