"""Training programs without Ray: plan positions, schedules, optimizer groups, named losses, and
the toy WGAN-GP's mechanics (frozen sides, gradient penalty through a gradient)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from xdtrain.models.adversarial_toy import ITEM, AdversarialToy, AdversarialToyConfig
from xdtrain.nn.program import OptimSpec, Phase, Program, Step, StreamSpec, resolve_program
from xdtrain.nn.sparse import pull_rows
from xdtrain.ps import LocalPS
from xdtrain.train import checkpointing as ck
from xdtrain.train import plan
from xdtrain.train.local_program import local_iteration
from xdtrain.train.optimizers import OptimizerSet, schedule_factor
from xdtrain.train.worker import pick_loss

DEFAULTS = dict(batch_size=64, epochs=3, patience=5, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)


class Plain(nn.Module):
    """A model with no program hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)


def program(streams: dict, optims: dict, phases: list) -> Program:
    model = Plain()
    model.streams, model.optimizers, model.plan = (lambda: streams), (lambda: optims), (lambda: phases)
    return resolve_program(model, **DEFAULTS)


def test_a_model_without_hooks_gets_one_stream_one_adam_one_phase():
    p = resolve_program(Plain(), **DEFAULTS)
    assert p.streams == {"train": StreamSpec(batch_size=64)}
    assert p.optimizers == {"main": OptimSpec(lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)}
    assert p.phases == [Phase(epochs=3, patience=5)]


@pytest.mark.parametrize("bad, match", [
    (dict(optims={"a": OptimSpec()}, phases=[Phase(steps=(Step("b"),))]), "unknown optimizer 'b'"),
    (dict(streams={"x": StreamSpec(), "y": StreamSpec()}, phases=[Phase(steps=(Step(streams=("x", "y")),))]),
     "at most one non-cycling stream"),
    (dict(optims={"a": OptimSpec(params=("",)), "b": OptimSpec(params=("",))},
          phases=[Phase(steps=(Step("a"), Step("b")))]), "belongs to both 'a' and 'b'"),
    (dict(optims={"main": OptimSpec(schedule="noam")}), "noam needs"),
    (dict(phases=[Phase(steps=(Step(streams=("nope",)),))]), "unknown streams"),
])
def test_bad_programs_name_what_is_wrong(bad, match):
    args = {"streams": {"train": StreamSpec()}, "optims": {"main": OptimSpec()}, "phases": [Phase()], **bad}
    with pytest.raises(ValueError, match=match):
        program(args["streams"], args["optims"], args["phases"])


def test_five_critic_steps_then_one_generator_step_and_epochs_end_anywhere_in_a_round():
    p = program({"train": StreamSpec()}, {"critic": OptimSpec(params=("c",)), "gen": OptimSpec(params=("g",))},
                [Phase(steps=(Step("critic", repeat=5), Step("gen")), epochs=2)])
    s = ck.EngineState()
    seen = []
    for _ in range(13):
        seen.append(plan.current(p, s)[1].optimizer)
        assert plan.after_iteration(p, s) == plan.Event.NONE
    assert seen == ["critic"] * 5 + ["gen"] + ["critic"] * 5 + ["gen"] + ["critic"]
    assert (s.round, s.step_index, s.step_iter) == (2, 0, 1)
    # the stream runs dry mid-round: a phase epoch, and the round goes on where it was
    assert plan.after_stream_epoch(p, s) == plan.Event.PHASE_EPOCH
    assert (s.round, s.step_index, s.step_iter) == (2, 0, 1)
    assert plan.next_position(p, s) == (0, 0)


def test_alternating_epochs_over_two_streams_make_a_round_a_phase_epoch():
    """AMID's Alg. 1: one epoch over O with `main`, then one over D with `dr`, repeated."""
    p = program({"O": StreamSpec(), "D": StreamSpec()},
                {"main": OptimSpec(params=("m",)), "dr": OptimSpec(params=("d",))},
                [Phase(steps=(Step("main", ("O",), epochs=1), Step("dr", ("D",), epochs=1)), epochs=50)])
    s = ck.EngineState()
    for _ in range(7):
        assert plan.after_iteration(p, s) == plan.Event.NONE  # epoch steps never hand over on a count
    assert plan.current(p, s)[1].streams == ("O",)
    assert plan.after_stream_epoch(p, s) == plan.Event.NONE
    assert plan.current(p, s)[1].streams == ("D",)
    assert plan.after_stream_epoch(p, s) == plan.Event.PHASE_EPOCH
    assert (s.round, plan.current(p, s)[1].streams) == (1, ("O",))


def test_an_iteration_bounded_phase_hands_over_to_the_next_phase():
    p = program({"train": StreamSpec()}, {"main": OptimSpec()},
                [Phase("warm", iterations=3, epochs=0), Phase("main", epochs=1)])
    s = ck.EngineState()
    assert plan.after_iteration(p, s) == plan.Event.NONE
    assert plan.next_position(p, s) == (0, 0)
    assert plan.after_iteration(p, s) == plan.Event.NONE
    assert plan.next_position(p, s) is None  # no read-ahead into another phase
    assert plan.after_iteration(p, s) == plan.Event.PHASE_ITERATIONS
    assert plan.enter_next_phase(p, s) and (s.phase, s.phase_iter) == (1, 0)
    assert not plan.enter_next_phase(p, s)


def test_schedules():
    noam = OptimSpec(schedule="noam", noam_d=64, warmup_steps=10)
    for t in (1, 5, 10, 11, 100):
        assert schedule_factor(noam, t - 1) == pytest.approx(64 ** -0.5 * min(t ** -0.5, t * 10 ** -1.5))
    warm = OptimSpec(schedule="warmup", warmup_steps=4)
    assert [schedule_factor(warm, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    lin = OptimSpec(schedule="linear", warmup_steps=2, total_steps=6)
    assert [schedule_factor(lin, s) for s in range(7)] == pytest.approx([0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    # the torch optimizer sees base lr x factor at each update
    model = Plain()
    opts = OptimizerSet(model, {"main": OptimSpec(kind="sgd", lr=0.1, betas=(0.9, 0.9), weight_decay=0.0,
                                                  schedule="warmup", warmup_steps=4)})
    lrs = []
    for _ in range(5):
        lrs.append(opts["main"].lr)
        model.lin.weight.grad = torch.ones_like(model.lin.weight)
        opts["main"].step(world=1)
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_named_optimizers_match_torch_and_restore_mid_schedule(kind):
    spec = OptimSpec(kind=kind, lr=0.05, betas=(0.8, 0.9), weight_decay=0.01, momentum=0.5,
                     schedule="linear", warmup_steps=2, total_steps=20, clip=0.5)
    torch.manual_seed(0)
    a, ref = Plain(), Plain()
    ref.load_state_dict(a.state_dict())
    opts = OptimizerSet(a, {"main": spec})
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind]
    kw = dict(momentum=0.5) if kind == "sgd" else dict(betas=(0.8, 0.9))
    tref = cls(ref.parameters(), lr=0.05, weight_decay=0.01, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(tref, lambda s: schedule_factor(spec, s))
    x = torch.randn(16, 2)
    for i in range(6):
        for m in (a, ref):
            m.zero_grad()
            (m.lin(x) ** 2).mean().backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
        tref.step()
        sched.step()
        opts["main"].step(world=1)
        if i == 2:  # a checkpoint and restore in the middle changes nothing
            saved = opts.state_dict()
            opts = OptimizerSet(a, {"main": spec})
            opts.load_state_dict(saved)
    for p, q in zip(a.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_pick_loss():
    loss = torch.tensor(2.0)
    assert pick_loss(loss, Step())[0] is loss
    out = {"a": torch.tensor(1.0), "b": torch.tensor(3.0)}
    assert float(pick_loss(out, Step())[0]) == 4.0  # the sum when no "loss" entry
    assert float(pick_loss({**out, "loss": loss}, Step())[0]) == 2.0
    assert float(pick_loss(out, Step(loss="b"))[0]) == 3.0
    with pytest.raises(KeyError, match="'c'"):
        pick_loss(out, Step(loss="c"))


# ---- the toy WGAN-GP ---------------------------------------------------------------------------

def toy(**kw) -> tuple[AdversarialToy, LocalPS, dict]:
    items = np.arange(100, 160, dtype=np.int64)
    model = AdversarialToy(AdversarialToyConfig(d=8, hidden=16, max_len=6, **kw), items, seed=0)
    ps = LocalPS(2)
    for spec in model.sparse_tables():
        ps.create_table(spec)
    rng = np.random.default_rng(0)
    rows = pa.table({"items": [rng.choice(items, 5).tolist() for _ in range(12)]})
    batch = {"train": model.make_batch(rows, rng, stream="train"), "aux": model.make_batch(rows, rng, stream="aux")}
    return model, ps, batch


def iterate(model, ps, opts, batch, step: str) -> dict:
    """One engine iteration, in process (world 1)."""
    p = resolve_program(model, **DEFAULTS)
    return local_iteration(model, ps, opts, next(s for ph in p.phases for s in ph.steps if s.label == step), batch)


def test_toy_program_freezes_the_other_side_bit_for_bit():
    model, ps, batch = toy()
    p = resolve_program(model, **DEFAULTS)
    opts = OptimizerSet(model, p.optimizers)
    snap = lambda prefix: {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}  # noqa: E731
    ids = np.unique(model.sparse_ids(batch)[ITEM].numpy())
    rows0 = ps.pull(ITEM, ids).clone()
    gen0 = snap("generator.")
    named = iterate(model, ps, opts, batch, "critic")
    assert set(named) == {"critic", "gp", "loss"}
    assert all(torch.equal(v, gen0[k]) for k, v in snap("generator.").items())
    assert torch.equal(ps.pull(ITEM, ids), rows0)  # the critic step pushes no item rows
    critic0 = snap("critic.")
    assert set(iterate(model, ps, opts, batch, "gen")) == {"gen"}
    assert all(torch.equal(v, critic0[k]) for k, v in snap("critic.").items())
    assert not torch.equal(ps.pull(ITEM, ids), rows0)  # the generator step moves the item rows
    assert any(not torch.equal(v, gen0[k]) for k, v in snap("generator.").items())


def test_gradient_penalty_of_a_linear_critic_is_analytic_and_back_propagates():
    model, ps, batch = toy()
    model.critic = nn.Linear(8, 1)
    emb = pull_rows(ps, model.sparse_ids(batch))
    out = model(batch, emb, step="critic")
    w = model.critic.weight.detach()
    assert float(out["gp"]) == pytest.approx(float((w.norm() - 1) ** 2), rel=1e-5)
    out["gp"].backward()  # through the gradient (create_graph)
    expected = 2 * (w.norm() - 1) * w / w.norm()
    torch.testing.assert_close(model.critic.weight.grad, expected, rtol=1e-4, atol=1e-6)
