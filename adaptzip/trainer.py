"""The distillation loop, apart from what it trains: a learning-rate probe, a plateau schedule,
and stops by convergence, by a step cap or by a wall-clock budget.

:class:`Loop` drives any objective given as two callables — ``step(opt, rows) -> loss`` (one
optimiser step on a batch of training rows) and ``heldout() -> float`` (the objective on the
held-out split, no gradient) — and the trained module (its ``state_dict`` is snapshotted and
restored). :mod:`adaptzip.distill` supplies them for a form live in the base model.

The rule, in order:

1. **Probe** (when no learning rate is given). From the start, each rate of :data:`LR_GRID` runs
   the same ``P`` batches (``P = clamp(steps / 25, 2, 12)``); while the largest rate probed so far
   wins, the probe goes on √10 higher, up to :data:`LR_MAX` (a weak start, e.g. VB-LoRA at 1% of
   the bytes, wanted the grid's top rate and was still improving at it). The rate whose held-out
   objective is lowest wins and training continues from *its* state and optimiser state, so its
   probe steps are not lost. A rate that makes the start worse loses to one that does not; if every rate makes it
   worse, the start is kept and training goes on at the smallest rate / 3.16.
2. **Plateau schedule.** A constant rate (after a linear warm-up when the rate was given, not
   probed), a held-out check every ``every`` steps (``clamp(steps / 12, 5, 25)``); the best state,
   the start included, is kept. When ``patience`` checks in a row do not improve the best by
   ``tol`` (relative), training returns to the best state and the rate falls by √10.
3. **A cap that follows progress.** ``steps`` is the cap; when it is reached while the run still
   improves — the best held-out objective fell by more than ``grow_gain`` (relative) over the
   last ``window`` steps (a third of ``steps``) — the cap grows by ``window``, up to ``most``
   steps (None: the cap is fixed). A run stopped at its cap while still improving fast ends far
   from what a longer run finds (docs/benchmarks.md, "Convergence at the defaults").
4. **Stops.** Converged: the rate has fallen ``reductions`` times and the held-out objective
   still does not improve. Or the cap was reached (the probe's steps included), or
   the next step and a closing check would pass ``seconds`` of wall-clock time (steps then
   follow from the measured step and check times); steps not yet checked are checked before that
   stop, so the last steps count.

Numbers returned (:meth:`Loop.run`): steps taken, the cap they ended at, the chosen rate, the
rate it ended with, the probe's objectives per rate, the best step, why it stopped, and the
held-out objective before and after.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor
LR_GRID = (1e-4, 3.16e-4, 1e-3, 3.16e-3)
LR_MAX = 3.16e-2  # the probe goes above the grid, √10 at a time, while its largest rate wins
LR_FALL = math.sqrt(10.0)


def probe_rates() -> list[float]:
    """Every rate the probe may try: the grid, then √10 at a time up to :data:`LR_MAX`."""
    rates = list(LR_GRID)
    while rates[-1] * LR_FALL <= LR_MAX * 1.001:
        rates.append(rates[-1] * LR_FALL)
    return rates


def probe_steps(steps: int) -> int:
    """Steps each probed rate runs: 1/25 of the step cap, between 2 and 12."""
    return max(2, min(12, steps // 25))


def check_every(steps: int) -> int:
    """Steps between held-out checks: 1/12 of the step cap, between 5 and 25."""
    return max(5, min(25, steps // 12))


@dataclass
class Loop:
    """One distillation run (see the module docstring).

    module: what is trained (snapshotted/restored through its state_dict); groups: optimiser
    parameter groups (a group may carry ``lr_scale``, × the run's rate); step(opt, rows) -> loss;
    heldout() -> objective; draw() -> the rows of the next training batch (seeded by the caller);
    tick(**fields) advances a progress bar by one step; grown(cap) is told the new cap when it grows."""

    module: nn.Module
    groups: list[dict]
    step: Callable[[torch.optim.Optimizer, Tensor], float]
    heldout: Callable[[], float]
    draw: Callable[[], Tensor]
    tick: Callable[..., None] = lambda **kw: None
    grown: Callable[[int], None] = lambda cap: None
    weight_decay: float = 0.0
    patience: int = 2
    reductions: int = 2
    tol: float = 1e-3
    warmup: float = 0.05
    grow_gain: float = 0.02
    info: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------- pieces
    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        pg = [
            {
                **{k: v for k, v in g.items() if k not in ("initial_lr", "lr_scale")},
                "lr": lr * g.get("lr_scale", 1.0),
                "lr_scale": g.get("lr_scale", 1.0),
            }
            for g in self.groups
        ]
        return torch.optim.AdamW(pg, lr=lr, weight_decay=self.weight_decay)

    @staticmethod
    def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]

    def _snapshot(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    @torch.no_grad()
    def _restore(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)

    # ----------------------------------------------------------------- the run
    def run(
        self, *, steps: int, lr: float | None = None, seconds: float | None = None, most: int | None = None
    ) -> dict[str, Any]:
        """Train for at most ``steps`` optimiser steps — a cap that grows up to ``most`` while the
        run still improves (None: fixed) — and ``seconds`` of wall-clock time (None: no limit);
        ``lr`` None probes :data:`LR_GRID`. The module ends in its best state."""
        t0 = time.perf_counter()
        start = self.heldout()
        self.info = {"heldout_before": start, "steps": 0, "best_step": 0, "stop": "nothing to train"}
        if steps <= 0 or start <= 1e-10:
            self.info.update(lr=lr, heldout_after=start)
            return self.info
        best, best_state, best_step = start, self._snapshot(), 0
        done = 0
        t_step = t_check = None  # measured seconds per step / per held-out check

        def over_time(extra: float) -> bool:
            return seconds is not None and time.perf_counter() - t0 + extra > seconds

        def one(opt, rows) -> float:
            nonlocal done, t_step
            ts = time.perf_counter()
            loss = self.step(opt, rows)
            dt = time.perf_counter() - ts
            t_step = dt if t_step is None else 0.8 * t_step + 0.2 * dt
            done += 1
            return loss

        def check() -> float:
            nonlocal t_check
            ts = time.perf_counter()
            v = self.heldout()
            t_check = time.perf_counter() - ts
            return v

        # 1. the probe
        probe: dict[str, float] = {}
        opt = None
        if lr is None:
            P = probe_steps(steps)
            rows = [self.draw() for _ in range(P)]
            init = best_state
            won: tuple[float, float, dict, dict] | None = None
            rates = probe_rates()
            cands = rates[: len(LR_GRID)]
            while cands:
                cand = cands.pop(0)
                if done + P > steps or over_time(P * (t_step or 0) + (t_check or 0)):
                    break
                self._restore(init)
                o = self._optimizer(cand)
                for r in rows:
                    self.tick(loss=one(o, r), lr=cand)
                v = check()
                probe[f"{cand:.3g}"] = v
                if won is None or v < won[0]:
                    won = (v, cand, self._snapshot(), o.state_dict())
                    if not cands and len(probe) < len(rates):
                        cands.append(rates[len(probe)])  # the largest rate so far won: look one step above
            if won is None:  # not even one rate could be probed within the limits
                self._restore(init)
                self.info.update(lr=None, steps=done, stop="time", heldout_after=start, probe=probe)
                return self.info
            v, lr, state, ostate = won
            if v < best:
                best, best_state, best_step = v, state, done
                self._restore(state)
                opt = self._optimizer(lr)
                opt.load_state_dict(ostate)
                self._set_lr(opt, lr)
            else:  # every probed rate made the start worse
                self._restore(init)
                lr = LR_GRID[0] / LR_FALL
        if opt is None:
            opt = self._optimizer(lr)
        n_warm = 0 if probe else max(1, int(self.warmup * steps))
        # 2. the plateau schedule, 3. a cap that follows progress
        chosen = lr
        every = check_every(steps)
        cap, most = steps, max(steps, most or steps)
        window = max(every, steps // 3)
        bests = [(0, start), (done, best)]  # (step, best so far) after the probe and each check
        since = falls = 0
        k = 0  # steps of this phase
        stop = "steps"
        unchecked = False  # steps taken since the last held-out check

        def keep_if_better(v: float) -> bool:
            nonlocal best, best_state, best_step
            if v < best * (1 - self.tol):
                best, best_state, best_step = v, self._snapshot(), done
                return True
            return False

        while done < cap:
            if over_time((t_step or 0) + (t_check or 0)):  # the next step and a closing check
                stop = "time"
                break
            cur = lr * (k + 1) / n_warm if k < n_warm else lr
            if k <= n_warm:
                self._set_lr(opt, cur)
            k += 1
            loss = one(opt, self.draw())
            unchecked = True
            if k % every and done < cap:
                self.tick(loss=loss, lr=cur)
                continue
            v = check()
            unchecked = False
            since = 0 if keep_if_better(v) else since + 1
            bests.append((done, best))
            if done >= cap and cap < most:
                before = [b for d, b in bests if d <= done - window]
                if before and best < before[-1] * (1 - self.grow_gain):  # still improving: grow
                    cap = min(most, cap + window)
                    self.grown(cap)
            self.tick(loss=loss, heldout=v, lr=cur)
            if since >= self.patience:
                if falls >= self.reductions:
                    stop = "converged"
                    break
                falls += 1
                since = 0
                lr /= LR_FALL
                self._restore(best_state)
                self._set_lr(opt, lr)
        if unchecked:  # stopped by time between checks: the last steps are checked before the stop
            keep_if_better(check())
        self._restore(best_state)
        self.info.update(
            lr=chosen,
            lr_final=lr,
            steps=done,
            cap=cap,
            best_step=best_step,
            stop=stop,
            lr_falls=falls,
            probe=probe or None,
            heldout_best=best,
            seconds=time.perf_counter() - t0,
        )
        return self.info
