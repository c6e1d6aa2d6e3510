"""pipeline/methods.py: one entry per method, the published defaults, the parts each entry builds."""
from dataclasses import replace
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
    assert (parts.discriminator is not None) == has_disc == (METHODS[name].adversary is not None)
    if has_projectors:
        shapes = {tuple(p.shape) for p in parts.projectors.parameters()}
        assert shapes and all(set(s) <= {4, 6, 8, 12} for s in shapes), shapes
    if has_disc:
        assert parts.discriminator(torch.randn(3, 8)).shape == (3, 1)
        (group,) = METHODS[name].adversary.optimizer(cfg, parts.discriminator).param_groups
        assert group["lr"] == 3e-4 and len(group["params"]) == len(list(parts.discriminator.parameters()))


def test_query_projector_only_for_the_attention_methods():
    teacher = SimpleNamespace(head=TeacherHead(torch.randn(11, 4)), tokenizer=None)
    names = {n: {k for k, _ in build_parts(resolve(DistillConfig(method=n)), teacher, None, _Student(),
                                           "cpu").projectors.named_parameters()}
             for n in ("dskd", "dskd-cma", "cma-ga", "chunk-attention", "chunk-projection")}
    assert all(any(k.startswith("query") for k in names[n]) for n in ("dskd-cma", "cma-ga", "chunk-attention"))
    assert not any(k.startswith("query") for n in ("dskd", "chunk-projection") for k in names[n])


# --- reference-mode options reach the loss functions (issue 13) -------------------------------------------------

def test_published_defaults_of_the_fidelity_items():
    """DSKDv2's released scripts: projector lr 5e-4; DWA-KD's: skewed reverse KL, KD_t2s warm-up over 300 steps;
    everything else fkl and no warm-up; a value the user sets stays."""
    assert resolve(DistillConfig(method="dskd-v2")).projector_lr == 5e-4
    assert resolve(DistillConfig(method="dskd-v2-eta")).projector_lr == 5e-4
    dwa = resolve(DistillConfig(method="dwa-kd"))
    assert (dwa.divergence, dwa.kd_warmup_steps, dwa.projector_lr) == ("srkl", 300, 1e-3)
    for name in ("dskd-cma", "cma-ga", "sft", "dskd-v2"):
        cfg = resolve(DistillConfig(method=name))
        assert (cfg.divergence, cfg.kd_warmup_steps) == ("fkl", 0), name
    assert resolve(DistillConfig(method="dwa-kd", divergence="fkl", kd_warmup_steps=0)).divergence == "fkl"


def test_released_ga_mode_has_no_discriminator_optimizer():
    teacher = SimpleNamespace(head=TeacherHead(torch.randn(11, 4)), tokenizer=None)
    cfg = resolve(DistillConfig(method="cma-ga", ga_mode="released"))
    parts = build_parts(cfg, teacher, None, _Student(), "cpu")
    adversary = METHODS["cma-ga"].adversary
    assert parts.discriminator is not None and adversary.optimizer(cfg, parts.discriminator) is None
    assert not any(adversary.steps_at(cfg, step) for step in range(5))
    paper = resolve(DistillConfig(method="cma-ga", disc_every=2, ga_start_step=1))
    assert [adversary.steps_at(paper, step) for step in range(5)] == [False, False, True, False, True]


def _inputs(cfg, **kw):
    from dskd_pipe.pipeline.methods import LossInputs

    batch = {"labels": torch.tensor([[-100, 1, 2, -100]]), "input_ids": torch.zeros(1, 4, dtype=torch.long),
             "teacher_input_ids": torch.zeros(1, 5, dtype=torch.long),
             "teacher_labels": torch.tensor([[-100, 1, 2, 3, -100]]),
             "teacher_attention_mask": torch.tensor([[1, 1, 1, 1, 0]]),
             "align_teacher_pos": torch.zeros(1, 0, dtype=torch.long),
             "align_student_pos": torch.zeros(1, 0, dtype=torch.long)}
    teacher = SimpleNamespace(head=None, embed=None, embed_scale=1.0)
    return LossInputs(resolve(cfg), batch, _Student(), torch.zeros(1, 4, 6), torch.zeros(1, 4, 11),
                      torch.zeros(1, 5, 4), teacher, MethodParts(), **kw)


def _record(monkeypatch, name):
    """Replace methods.<name> by a recorder of its keyword arguments; the entry's own code still runs."""
    from dskd_pipe.pipeline import methods

    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise StopIteration  # stop right after the call: the entry's wiring is what is under test

    monkeypatch.setattr(methods, name, fake)
    return seen


@pytest.mark.parametrize("cma_std", ["valid", "padded"])
def test_cma_std_option_reaches_the_attention(monkeypatch, cma_std):
    seen = _record(monkeypatch, "dskd_cma_loss")
    with pytest.raises(StopIteration):
        METHODS["dskd-cma"].loss(_inputs(DistillConfig(method="dskd-cma", cma_std=cma_std)))
    mask = seen["teacher_attention_mask"]
    assert (mask is None) == (cma_std == "padded")
    if mask is not None:
        assert mask.tolist() == [[True, True, True, True, False]]


@pytest.mark.parametrize("method", ["dskd-cma", "cma-ga", "chunk-attention"])
def test_diagnosis_options_reach_the_cma_loss(monkeypatch, method):
    """--t2s-kd-rows and --projector-warmup-steps (BENCHMARKS.md): the student gets KD only from step N on."""
    seen = _record(monkeypatch, "dskd_cma_loss")
    for step, student_kd in ((0, True), (4, True)):
        with pytest.raises(StopIteration):
            METHODS[method].loss(_inputs(DistillConfig(method=method), step=step))
        assert (seen["t2s_kd_rows"], seen["student_kd"]) == ("accurate", student_kd)
    cfg = DistillConfig(method=method, t2s_kd_rows="all", projector_warmup_steps=5)
    for step, student_kd in ((0, False), (4, False), (5, True)):
        with pytest.raises(StopIteration):
            METHODS[method].loss(_inputs(cfg, step=step))
        assert (seen["t2s_kd_rows"], seen["student_kd"]) == ("all", student_kd)


def test_ga_balance_options_reach_the_discriminator(monkeypatch):
    """--disc-spectral-norm builds D with spectrally normalised layers; --ga-reachable-keys shows D (its step, the
    generator term, the logged accuracy) the keys projected onto the query projector's span; --ga-directions asks
    every D call to normalise its inputs (BENCHMARKS.md "Why the discriminator wins")."""
    from torch.nn.utils import parametrize

    from dskd_pipe.pipeline import methods
    from dskd_pipe.pipeline.objectives import cma_ga

    # dt = 8 > ds = 6: the query projector Linear(12, 16) reaches a 12-dimensional part of the keys' 16
    teacher = SimpleNamespace(head=TeacherHead(torch.randn(11, 8)), tokenizer=None)
    for spectral in (False, True):
        parts = build_parts(resolve(DistillConfig(method="cma-ga", disc_spectral_norm=spectral)), teacher, None,
                            _Student(), "cpu")
        assert any(parametrize.is_parametrized(m) for m in parts.discriminator.modules()) == spectral
    zero = torch.tensor(0.0)
    out = SimpleNamespace(loss=zero, keys=torch.randn(1, 5, 16), queries=torch.randn(1, 4, 16, requires_grad=True),
                          teacher_mask=torch.tensor([[0, 1, 1, 1, 0]]), student_mask=torch.tensor([[0, 1, 1, 0]]),
                          ce_student=zero, ce_t2s=zero, kd_t2s=zero, kd_s2t=zero, t2s_correct=zero, s2t_correct=zero,
                          n_teacher=zero, attention_entropy=None)
    monkeypatch.setattr(methods, "_cma_call", lambda x: out)
    seen = {}
    for name in ("discriminator_loss", "generator_loss", "discriminator_accuracy"):
        real = getattr(cma_ga, name)

        def spy(disc, *args, _name=name, _real=real, **kwargs):
            seen[_name] = (args, kwargs)
            return _real(disc, *args, **kwargs)

        monkeypatch.setattr(cma_ga, name, spy)
    for reachable, directions in ((False, False), (True, True)):
        cfg = resolve(DistillConfig(method="cma-ga", ga_reachable_keys=reachable, ga_directions=directions))
        parts = build_parts(cfg, teacher, None, _Student(), "cpu")
        x = _inputs(DistillConfig(method="cma-ga", ga_reachable_keys=reachable, ga_directions=directions),
                    adversary_step=True)
        x = replace(x, parts=parts)
        METHODS["cma-ga"].loss(x)
        keys_r = out.keys[out.teacher_mask.bool()]
        shown = cma_ga.reachable_keys(keys_r, parts.projectors.query) if reachable else keys_r
        assert reachable == (not torch.allclose(shown, keys_r))
        assert torch.allclose(seen["discriminator_loss"][0][0], shown)
        assert torch.allclose(seen["discriminator_accuracy"][0][0], shown)
        assert seen["discriminator_loss"][1]["normalize_directions"] == directions
        assert seen["generator_loss"][1]["normalize_directions"] == directions
        assert seen["discriminator_accuracy"][0][2] == directions


def test_dskd_v2_options_reach_the_loss(monkeypatch):
    seen = _record(monkeypatch, "dskd_v2_same_vocab_loss")
    cfg = DistillConfig(method="dskd-v2", v2_mean_weighting="micro-batch", v2_agreement_threshold=1.0,
                        same_vocab_teacher_temperature=True)
    with pytest.raises(StopIteration):
        METHODS["dskd-v2"].loss(_inputs(cfg, step_tokens=30.0, step_micro_batches=4))
    assert seen["mean_weight"] == 7.5 and seen["agreement_threshold"] == 1.0 and seen["t2s_teacher_temperature"]
    seen = _record(monkeypatch, "dskd_v2_eta_loss")
    with pytest.raises(StopIteration):
        METHODS["dskd-v2-eta"].loss(_inputs(DistillConfig(method="dskd-v2-eta"), step_tokens=30.0))
    assert seen["mean_weight"] is None and seen["agreement_threshold"] is None
    assert not seen["t2s_teacher_temperature"]


def test_dwa_options_gamma_and_warmup_reach_the_loss(monkeypatch):
    from dskd_pipe.pipeline.objectives.dwa import dtw_gamma

    seen = _record(monkeypatch, "dwa_kd_loss")
    with pytest.raises(StopIteration):
        METHODS["dwa-kd"].loss(_inputs(DistillConfig(method="dwa-kd"), step=29, total_steps=100))
    assert seen["gamma"] == pytest.approx(dtw_gamma(29, 3570)) and seen["kd_scale"] == pytest.approx(0.1)
    assert (seen["divergence"], seen["weights"], seen["dtw_inputs"], seen["dtw_positions"], seen["dtw_reduction"],
            seen["kd_warmup_terms"]) == ("srkl", "paper", "raw", "response", "sequence", "t2s")
    assert seen["teacher_attention_mask"] is not None
    cfg = DistillConfig(method="dwa-kd", dtw_gamma_steps=0, kd_warmup_steps=0, dwa_weights="released",
                        dtw_inputs="normalised", dtw_positions="released", dtw_reduction="tokens",
                        kd_warmup_terms="both", cma_std="padded")
    with pytest.raises(StopIteration):
        METHODS["dwa-kd"].loss(_inputs(cfg, step=29, total_steps=100))
    assert seen["gamma"] == pytest.approx(2.0 - 1.2 * 0.3) and seen["kd_scale"] == 1.0  # whole-run anneal, no ramp
    assert (seen["weights"], seen["dtw_inputs"], seen["dtw_positions"], seen["dtw_reduction"],
            seen["kd_warmup_terms"], seen["teacher_attention_mask"]) == ("released", "normalised", "released",
                                                                          "tokens", "both", None)


def test_eta_unmapped_option_builds_the_token_map():
    from dskd_pipe.pipeline.models import load_tokenizer

    qwen, gpt2 = (load_tokenizer(f"tests/fixtures/tokenizers/{n}") for n in ("qwen2", "gpt2"))
    teacher = SimpleNamespace(head=TeacherHead(torch.randn(len(qwen), 4)), tokenizer=qwen)
    maps = {u: build_parts(resolve(DistillConfig(method="dskd-v2-eta", eta_unmapped=u)), teacher, gpt2,
                           _Student(vocab=len(gpt2)), "cpu").token_map for u in ("drop", "unk")}
    missing = maps["drop"] == -1
    assert missing.any() and (maps["unk"][missing] == gpt2.unk_token_id).all()
    assert torch.equal(maps["unk"][~missing], maps["drop"][~missing])


def test_diagnosis_option_values_are_checked_together():
    """Bad values of the quality-diagnosis options are reported with the others, by flag name."""
    from dskd_pipe.pipeline.config import ConfigError
    from dskd_pipe.stages.distill import check_config

    cfg = DistillConfig(method="dskd-cma", student="s", data="d.jsonl", out="o", cache="c.zarr",
                        projector_warmup_steps=-1, t2s_kd_rows="some", t2s_values="target")
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    for line in ("--projector-warmup-steps must be >= 0, found -1.",
                 "--t2s-kd-rows 'some': choose one of accurate, all, none.",
                 "--t2s-values 'target': choose one of hidden+target, hidden."):
        assert line in str(e.value), line
    released = DistillConfig(method="cma-ga", student="s", data="d.jsonl", out="o", cache="c.zarr",
                             ga_mode="released", ga_reachable_keys=True)
    with pytest.raises(ConfigError, match="--ga-mode released keeps the released code's fixed random D"):
        check_config(released)


# --- entries composed of a base method and likelihood terms (issue 22) ------------------------------------------

def _composition(base, kd_rate=0.3, balance="weights"):
    """A composition of `base` with two stand-in terms whose values are known functions of the student's logits."""
    from dskd_pipe.pipeline.methods import Shown, Term, compose

    def value(scale):
        return lambda x: ((x.logits * scale).sum(), {f"t{scale}": torch.tensor(float(scale))})

    method = compose("test", "a test composition", base, Term("a", value(2.0), (Shown("t2.0", "a", "a"),)),
                     Term("b", value(3.0), (Shown("t3.0", "b", "b"),)))
    cfg = DistillConfig(method="sft", kd_rate=kd_rate, loss_balance=balance)
    logits = torch.randn(1, 4, 11, requires_grad=True)
    x = _inputs(cfg)
    x = replace(x, logits=logits)
    return method, x, logits


def test_composition_adds_kd_rate_times_each_term_to_the_base():
    from dskd_pipe.pipeline.objectives.divergences import cross_entropy_sum

    method, x, logits = _composition(None, kd_rate=0.3)
    out = method.loss(x)
    ce = cross_entropy_sum(logits, x.labels)
    want = 0.7 * ce + 0.3 * (2.0 * logits.sum() + 3.0 * logits.sum())
    torch.testing.assert_close(out.loss, want)
    assert {"ce_student", "t2.0", "t3.0"} <= out.logs.keys()
    m = method.metrics({"ce_student": 4.0, "t2.0": 6.0, "t3.0": 2.0}, 2.0)
    assert m == {"ce_student": 2.0, "t2.0": 3.0, "t3.0": 1.0}
    # with a base method its whole loss is the base part
    sft_based, x2, logits2 = _composition(METHODS["sft"], kd_rate=0.3)
    torch.testing.assert_close(sft_based.loss(x2).loss,
                               cross_entropy_sum(logits2, x2.labels) + 0.3 * 5.0 * logits2.sum())


def test_composition_with_gradmag_balances_the_parts(monkeypatch):
    """--loss-balance gradmag: sum_i w_i part_i / sum_i w_i with w_i the inverse norm of part_i's gradient on the
    last block (here the logits stand in for it); the shares are logged."""
    from dskd_pipe.pipeline import methods
    from dskd_pipe.pipeline.objectives.divergences import cross_entropy_sum

    method, x, logits = _composition(None, kd_rate=0.5, balance="gradmag")
    monkeypatch.setattr(methods, "last_block_parameters", lambda model: [logits])
    out = method.loss(x)
    ce = cross_entropy_sum(logits, x.labels)
    parts = [0.5 * ce, 0.5 * 2.0 * logits.sum(), 0.5 * 3.0 * logits.sum()]
    norms = [torch.autograd.grad(p, logits, retain_graph=True)[0].norm() for p in parts]
    w = torch.stack([1 / n for n in norms])
    torch.testing.assert_close(out.loss, sum(wi * p for wi, p in zip(w, parts)) / w.sum())
    shares = [float(out.logs[f"gradmag_{k}_sum"]) / float(x.n_student) for k in ("base", "a", "b")]
    assert shares == pytest.approx((w / w.sum()).tolist(), rel=1e-5)


@pytest.mark.parametrize("name,base", [("alm", None), ("prefix-kd", None), ("alm+prefix-kd", None),
                                       ("cma-ga+alm", "cma-ga"), ("cma-ga+prefix-kd", "cma-ga"),
                                       ("cma-ga+alm+prefix-kd", "cma-ga")])
def test_composed_entries_keep_the_base_and_add_the_terms_tables_and_extras(name, base):
    """A composed entry keeps its base's parts, adversary and published defaults, and gets its terms' tables and
    chunk ids from one collate extra."""
    from dskd_pipe.pipeline.models import load_tokenizer

    tok = load_tokenizer("tests/fixtures/tokenizers/gpt2")
    teacher = SimpleNamespace(head=TeacherHead(torch.randn(len(tok), 4)), tokenizer=tok)
    method = METHODS[name]
    cfg = resolve(DistillConfig(method=name))
    parts = build_parts(cfg, teacher, tok, _Student(vocab=len(tok)), "cpu")
    assert (method.adversary is not None) == (parts.discriminator is not None) == (base == "cma-ga")
    if base:
        assert method.defaults == METHODS[base].defaults and cfg.projector_lr == 1e-3
    if "alm" in name:
        assert parts.tables["teacher_word_start"].shape == (len(tok),)
    if "prefix-kd" in name:
        assert parts.tables["teacher_events"].shape == (len(tok),) and parts.tables["n_events"] > 100
    extra = method.collate_extras(tok, tok)
    items = [{"offsets": [[0, 0], [0, 3], [3, 6], [6, 6]], "student_offsets": [[0, 0], [0, 6], [6, 6]]}]
    out = extra(items, [[5, 6, 7]], [[8, 9]])  # label rows: every position supervised
    assert out["teacher_chunk"].tolist() == [[0, 0, 1]] and out["student_chunk"].tolist() == [[0, 1]]


def test_likelihood_options_reach_their_losses(monkeypatch):
    seen = _record(monkeypatch, "alm_loss")
    cfg = DistillConfig(method="alm", alm_temperature=50.0, alm_debias="space", alm_merge_threshold=0.2,
                        alm_mean="released")
    x = _inputs(cfg)
    x.batch.update(teacher_chunk=torch.zeros(1, 5, dtype=torch.long), student_chunk=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(StopIteration):
        METHODS["alm"].loss(x)
    assert (seen["tau"], seen["debias"], seen["merge_threshold"], seen["mean_over"]) == (50.0, "space", 0.2,
                                                                                         "released")
    from dskd_pipe.pipeline.models import load_tokenizer

    tok = load_tokenizer("tests/fixtures/tokenizers/gpt2")
    teacher = SimpleNamespace(head=TeacherHead(torch.randn(len(tok), 4)), tokenizer=tok)
    sizes = {k: build_parts(resolve(DistillConfig(method="prefix-kd", prefix_chars=k)), teacher, tok,
                            _Student(vocab=len(tok)), "cpu").tables["n_events"] for k in (1, 2)}
    assert sizes[1] < sizes[2]


# --- methods from other packages (MethodTable) and a method's own options ---------------------------------------

PLUGIN = '''
from dskd_pipe import LossTerms, Method, MethodOption
from dskd_pipe.losses import cross_entropy_sum


def _loss(x):
    ce = cross_entropy_sum(x.logits, x.labels)
    return LossTerms(ce, {"ce_student": ce.detach()})


def _metrics(sums, n):
    return {"ce_student": sums["ce_student"] / n}


GOOD = Method("plug-a", "a plugin method", _loss, _metrics, options={"beta": MethodOption(0.5, "a weight")})
PAIR = [Method("plug-b", "one of two", _loss, _metrics), Method("plug-c", "two of two", _loss, _metrics)]
TAKEN = Method("sft", "a second sft", _loss, _metrics)
MISNAMED = Method("other-name", "named unlike its entry point", _loss, _metrics)
NOT_A_METHOD = {"name": "plug-d"}
'''


def _table(tmp_path, monkeypatch, entries: dict[str, str]):
    """A fresh MethodTable over the built-in entries whose installed entry points are `entries` (name -> value)."""
    from importlib.metadata import EntryPoint

    from dskd_pipe.pipeline import methods

    (tmp_path / "toy_method_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [EntryPoint(name, value, methods.ENTRY_POINT_GROUP) for name, value in entries.items()]
    calls = []
    monkeypatch.setattr(methods, "_entry_points", lambda: calls.append(1) or eps)
    builtin = {name: METHODS[name] for name in ("sft", "kd")}
    return methods.MethodTable(builtin), calls


def test_installed_methods_join_the_table_on_first_read_and_bad_ones_are_left_out_named(tmp_path, monkeypatch):
    table, calls = _table(tmp_path, monkeypatch, {
        "plug-a": "toy_method_plugin:GOOD", "pair": "toy_method_plugin:PAIR", "sft": "toy_method_plugin:TAKEN",
        "plug-x": "toy_method_plugin:MISNAMED", "plug-d": "toy_method_plugin:NOT_A_METHOD",
        "gone": "toy_method_plugin_missing:X"})
    assert calls == []  # nothing is imported until the table is read
    assert list(table) == ["sft", "kd", "plug-a", "plug-b", "plug-c"] and calls == [1]
    assert "plug-a" in table and table["plug-a"].options["beta"].default == 0.5 and len(table) == 5
    assert table.origin("sft") == "built-in" and table["sft"].summary != "a second sft"
    assert table.origin("plug-b") == "an unnamed package (entry point pair = toy_method_plugin:PAIR)"
    problems = "\n".join(table.problems)
    for line in ("(entry point sft = toy_method_plugin:TAKEN): method 'sft' is taken by built-in; left out. Rename it.",
                 "(entry point plug-x = toy_method_plugin:MISNAMED) did not load (ValueError: the entry point is "
                 "named 'plug-x', its Method 'other-name': name them the same). Fix or uninstall it.",
                 "(entry point plug-d = toy_method_plugin:NOT_A_METHOD) did not load (TypeError: expected a "
                 "dskd_pipe Method (or a list of them), found dict)",
                 "(entry point gone = toy_method_plugin_missing:X) did not load (ModuleNotFoundError: "):
        assert line in problems, line
    table.load()
    assert calls == [1]  # once per process


def test_unknown_method_names_the_methods_and_what_was_left_out(tmp_path, monkeypatch):
    from dskd_pipe.pipeline import methods

    table, _ = _table(tmp_path, monkeypatch, {"gone": "toy_method_plugin_missing:X"})
    monkeypatch.setattr(methods, "METHODS", table)
    message = methods.unknown_method("gone")
    assert message.startswith("--method 'gone': choose one of sft, kd. Left out: an unnamed package (entry point "
                              "gone = toy_method_plugin_missing:X) did not load (ModuleNotFoundError")
    with pytest.raises(KeyError, match="unknown method 'gone'; choose one of sft, kd. Left out: "):
        methods.get_method("gone")


def test_a_methods_own_options_take_their_defaults_and_checked_values(tmp_path, monkeypatch):
    from dskd_pipe.pipeline import methods
    from dskd_pipe.pipeline.config import ConfigError

    toy = methods.Method("toy", "a test method", None, None, options={
        "beta": methods.MethodOption(0.5, "a weight"), "steps": methods.MethodOption(3, "how many"),
        "mode": methods.MethodOption("a", "which", choices=("a", "b")), "on": methods.MethodOption(False, "a flag")})
    monkeypatch.setitem(methods.METHODS, "toy", toy)
    assert methods.method_options(DistillConfig(method="toy")) == {"beta": 0.5, "steps": 3, "mode": "a", "on": False}
    cfg = DistillConfig(method="toy", method_options=("beta=2", "mode = b", "on=yes"))
    assert methods.method_options(cfg) == {"beta": 2.0, "steps": 3, "mode": "b", "on": True}
    bad = DistillConfig(method="toy", method_options=("steps=1.5", "mode=c", "gamma=1", "beta", "on=maybe"))
    with pytest.raises(ConfigError) as e:
        methods.method_options(bad)
    assert str(e.value).splitlines() == [
        "--method-option steps: expected an integer, found '1.5'.",
        "--method-option mode: 'c' is not one of a, b.",
        "--method-option 'gamma=1': toy has no option 'gamma' (its options: beta, steps, mode, on); write NAME=VALUE "
        "(dskd-pipe methods lists each method's options).",
        "--method-option 'beta': toy has no option 'beta' (its options: beta, steps, mode, on); write NAME=VALUE "
        "(dskd-pipe methods lists each method's options).",
        "--method-option on: expected true or false, found 'maybe'."]
    with pytest.raises(ConfigError, match="sft has no option 'beta' \\(its options: none\\)"):
        methods.method_options(DistillConfig(method="sft", method_options=("beta=1",)))


def test_entries_declare_the_options_they_read():
    """Method.settings name DistillConfig fields; every option of the reference-mode and diagnosis groups is read
    by some entry (the model card shows an entry's settings; README's option table names the methods)."""
    import dataclasses

    from dskd_pipe.pipeline.config import DistillConfig

    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    claimed = {s for m in METHODS.values() for s in m.settings}
    assert claimed <= fields, claimed - fields
    for name in ("lambda_ga", "ga_mode", "disc_every", "cma_std", "t2s_kd_rows", "v2_mean_weighting", "eta_unmapped",
                 "dwa_weights", "dtw_reduction", "alm_temperature", "alm_mean", "prefix_chars", "loss_balance"):
        assert name in claimed, name
    assert "lambda_ga" in METHODS["cma-ga+alm"].settings and "alm_debias" in METHODS["cma-ga+alm"].settings
    assert "lambda_ga" not in METHODS["dskd-cma"].settings and not METHODS["sft"].settings
    shown = [s.key for s in METHODS["cma-ga+prefix-kd"].shown]
    assert shown[:1] == ["ce_student"] and "l_g" in shown and shown[-1] == "prefix_kd"
