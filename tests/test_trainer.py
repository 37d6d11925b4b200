"""The distillation loop (adaptzip.trainer.Loop) on a problem whose answer is known: a linear
student learning a fixed linear teacher, held-out = the same loss on other rows. The probe's
choice, the plateau schedule, every stop (steps, convergence, time) and the best-state rule are
checked with numbers."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from adaptzip import pipeline, trainer


def _problem(seed: int = 0, n: int = 256, d: int = 16, noise: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    W = 0.05 * torch.randn(d, d, generator=g)  # reachable by Adam at the grid's rates
    Y = X @ W.T + noise * torch.randn(n, d, generator=g)
    student = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        student.weight.zero_()
    train, hold = slice(0, n // 2), slice(n // 2, n)

    def loss_on(rows_x, rows_y):
        return ((student(rows_x) - rows_y) ** 2).mean()

    def step(opt, rows):
        loss = loss_on(X[train][rows], Y[train][rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def heldout():
        return float(loss_on(X[hold], Y[hold]))

    gen = torch.Generator().manual_seed(seed + 1)
    loop = trainer.Loop(
        module=student,
        groups=[{"params": list(student.parameters())}],
        step=step,
        heldout=heldout,
        draw=lambda: torch.randint(n // 2, (16,), generator=gen),
    )
    return loop, student, heldout


def test_probe_picks_the_rate_that_helps_most_and_keeps_its_steps():
    loop, _, heldout = _problem()
    start = heldout()
    info = loop.run(steps=200)
    probe = info["probe"]
    rates = [float(k) for k in probe]
    assert rates[:4] == [float(f"{x:.3g}") for x in trainer.LR_GRID]
    # on a well-conditioned quadratic far from its optimum, the largest rate moves furthest, so
    # the probe goes above the grid (√10 at a time) until a larger rate no longer wins
    assert len(rates) > 4 and rates[4] == pytest.approx(trainer.LR_GRID[-1] * trainer.LR_FALL, rel=1e-2)
    best = min(probe, key=probe.get)
    assert info["lr"] == pytest.approx(float(best), rel=1e-2) and float(best) > trainer.LR_GRID[-1]
    assert float(best) == max(rates) or float(best) == sorted(rates)[-2]
    assert max(rates) <= trainer.LR_MAX * 1.01
    # every key the probe can write has header room reserved in a container's metrics
    keys = {f"{r:.3g}" for r in trainer.probe_rates()}
    assert set(probe) <= keys and len(keys) == 6
    assert (
        set(
            pipeline.metrics_template(SimpleNamespace(modules=[SimpleNamespace(name="q_proj")]), True)[
                "distill_lr_probe"
            ]
        )
        == keys
    )
    assert probe[best] < probe[f"{trainer.LR_GRID[0]:.3g}"] < start
    # the probe's steps count (4 rates × P), and the module ends in its best state
    assert info["steps"] <= 200 and info["steps"] >= 4 * trainer.probe_steps(200)
    assert heldout() == pytest.approx(info["heldout_best"], rel=1e-6)
    assert info["heldout_best"] < 0.2 * start


def test_converged_stop_after_the_rate_falls():
    """A noiseless problem is solved long before 5000 steps: the loop stops by convergence, after
    the rate fell ``reductions`` times, far from the step cap."""
    loop, _, heldout = _problem(noise=0.0)
    info = loop.run(steps=5000, lr=3e-2)
    assert info["stop"] == "converged" and info["lr_falls"] == loop.reductions
    assert info["steps"] < 5000
    assert info["lr_final"] == pytest.approx(3e-2 / trainer.LR_FALL**loop.reductions)
    assert heldout() < 1e-3


def test_step_cap_and_best_state_never_worse_than_start():
    loop, _, heldout = _problem()
    start = heldout()
    info = loop.run(steps=12, lr=1e3)  # a rate that diverges
    assert info["steps"] == 12 and info["stop"] == "steps"
    assert heldout() <= start * (1 + 1e-9) and info["best_step"] == 0


def test_every_probed_rate_worse_keeps_the_start_and_goes_below_the_grid():
    """Already at the optimum (the student is the teacher): every probed rate makes the held-out
    loss worse (noise in the training rows), so the start is kept and the rate goes below the grid."""
    loop, student, heldout = _problem(noise=0.5)
    # start at the least-squares optimum of the held-out rows
    loop.run(steps=3000, lr=3e-2)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    info = loop.run(steps=100)
    if min(info["probe"].values()) >= info["heldout_before"]:
        assert info["lr"] == pytest.approx(trainer.LR_GRID[0] / trainer.LR_FALL)
    assert heldout() <= info["heldout_before"] * (1 + 1e-9)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in state.items()) or info["best_step"] > 0


def test_time_budget_stops_before_it_is_spent():
    loop, _, _ = _problem()
    slow = loop.step

    def step(opt, rows):
        time.sleep(0.01)
        return slow(opt, rows)

    loop.step = step
    t0 = time.perf_counter()
    info = loop.run(steps=10_000, lr=1e-3, seconds=0.5)
    took = time.perf_counter() - t0
    assert info["stop"] == "time"
    assert took < 0.5 + 0.05  # the next step would have passed the budget: not taken
    assert 20 <= info["steps"] <= 50  # steps follow from the measured step time (~10 ms)


def test_no_steps_or_nothing_to_learn():
    loop, student, heldout = _problem()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    info = loop.run(steps=0)
    assert info["steps"] == 0 and all(torch.equal(student.state_dict()[k], v) for k, v in before.items())


def test_the_cap_grows_while_the_run_still_improves_and_not_after():
    """A rate too small for the cap (3e-4 on a problem that needs ~500 steps): at the cap of 150
    the held-out loss still falls fast, so the cap grows by a third of it at a time while the
    last third improved the best by more than ``grow_gain``, then stops short of ``most``; the
    longer run ends far closer to the noise floor (0.3² = 0.09). A problem already solved before
    its cap never grows it."""
    floor = 0.3**2
    loop, _, heldout = _problem(noise=0.3, n=2048, d=32)
    fixed = loop.run(steps=150, lr=3e-4)
    assert fixed["stop"] == "steps" and fixed["cap"] == 150 and fixed["steps"] == 150
    excess_fixed = heldout() - floor
    loop, _, heldout = _problem(noise=0.3, n=2048, d=32)
    caps = []
    loop.grown = caps.append
    bests = []
    loop.tick = lambda **f: bests.append(f["heldout"]) if "heldout" in f else None
    grown = loop.run(steps=150, lr=3e-4, most=900)
    assert len(caps) >= 2 and all(b - a == 50 for a, b in zip([150, *caps], caps, strict=False))
    assert grown["cap"] == caps[-1] < 900 and grown["steps"] == grown["cap"] and grown["stop"] == "steps"
    assert heldout() - floor < 0.5 * excess_fixed
    # it stopped growing because the last window (50 steps; checks every 12) improved the best by
    # ≤ 2%, so the last two checks did too
    best = [min(bests[: i + 1]) for i in range(len(bests))]
    assert best[-1] >= best[-3] * (1 - loop.grow_gain)
    # a solved problem: converged long before the cap, which never grows
    loop, _, _ = _problem(noise=0.0)
    loop.grown = caps.append
    n = len(caps)
    info = loop.run(steps=2000, lr=3e-2, most=6000)
    assert info["stop"] == "converged" and info["cap"] == 2000 and len(caps) == n
