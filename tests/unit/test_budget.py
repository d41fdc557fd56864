"""The budget guard: hand-computed decisions, and a simulated run that never spends past the cap."""
import random

import pytest

from mmray.cost.budget import BudgetGuard, decide


@pytest.mark.parametrize("spent, burn, interval_s, reserve_s, budget, stop, projected", [
    # $36/h is $0.01/s
    (9.0, 36.0, 50, 10, 10.0, False, 9.6),    # 9 + 0.01 * 60
    (9.0, 36.0, 90, 10, 10.0, False, 10.0),   # exactly at the cap: allowed
    (9.0, 36.0, 100, 10, 10.0, True, 10.1),   # one cent over: stop
    (9.99, 36.0, 0, 2, 10.0, True, 10.01),    # not even a stop fits any more: stop now
    (0.0, 0.0, 1e9, 0, 0.01, False, 0.0),     # nothing burning (local CPU at $0): never stops
    (123.0, 360.0, 3600, 60, 0.0, False, 489.0),  # budget 0: no cap
])
def test_decide_hand_computed(spent, burn, interval_s, reserve_s, budget, stop, projected):
    d = decide(spent, burn, interval_s, budget, reserve_s)
    assert d.stop is stop
    assert d.projected_usd == pytest.approx(projected)
    if stop:
        assert "checkpointing and stopping" in d.reason and f"${budget:.2f}" in d.reason


def test_decide_rejects_negative_inputs():
    with pytest.raises(ValueError, match="burn_usd_per_hour"):
        decide(1.0, -1.0, 10, 5.0)


def test_guard_uses_the_slowest_recent_step_and_checkpoint():
    g = BudgetGuard(10.0, safety=1.5, teardown_s=20, window=2, checkpoint_s_guess=2.0)
    assert g.step_s is None and g.reserve_s == 2.0 * 1.5 + 20  # the guess until a checkpoint is timed
    d = g.check(9.0, 36.0, steps_next=100)  # no step time yet: only the stop is projected
    assert not d.stop and d.next_interval_s == 0 and "no step time" in d.reason
    g.observe_steps(10, 20.0)   # 2.0 s/step
    g.observe_steps(10, 10.0)   # 1.0 s/step
    assert g.step_s == pytest.approx(3.0)  # max(2, 1) * 1.5
    g.observe_steps(10, 10.0)   # the 2.0 s/step interval leaves the window of 2
    assert g.step_s == pytest.approx(1.5)
    g.observe_checkpoint(4.0)
    g.observe_checkpoint(2.0)
    assert g.reserve_s == pytest.approx(4.0 * 1.5 + 20)
    d = g.check(9.0, 36.0, steps_next=10)  # 9 + 0.01 * (15 + 26)
    assert d.projected_usd == pytest.approx(9.41) and not d.stop
    d = g.check(9.0, 36.0, steps_next=100)  # 9 + 0.01 * (150 + 26)
    assert d.projected_usd == pytest.approx(10.76) and d.stop
    with pytest.raises(ValueError, match="safety"):
        BudgetGuard(1.0, safety=0.5)


@pytest.mark.parametrize("seed", range(30))
def test_simulated_runs_never_cross_the_cap(seed):
    """A loop that measures its first step, then asks the guard before every checkpoint interval, with noisy step
    and checkpoint times (within the guard's safety factor) and a burn rate that hits the cap within the run: the
    money spent at the final stop (checkpoint and teardown included) is never above the cap."""
    rng = random.Random(seed)
    checkpoint_every = rng.choice([1, 5, 20, 50])
    base_step_s, base_ckpt_s, teardown_s = rng.uniform(0.05, 3.0), rng.uniform(1.0, 30.0), 10.0
    burn = rng.uniform(1.0, 400.0)  # $/h
    # The one thing the guard cannot project: the first step and one stop must fit.
    floor = burn * (1.1 * base_step_s + 1.1 * base_ckpt_s + teardown_s) / 3600.0
    budget = floor * rng.uniform(1.0, 50.0)
    guard = BudgetGuard(budget, safety=1.25, teardown_s=teardown_s, checkpoint_s_guess=1.1 * base_ckpt_s)
    spent = 0.0

    def pay(seconds: float) -> None:
        nonlocal spent
        spent += burn * seconds / 3600.0

    def run_steps(n: int) -> None:
        times = [base_step_s * rng.uniform(0.9, 1.1) for _ in range(n)]  # 1.1 < 0.9 * 1.25: within safety
        pay(sum(times))
        guard.observe_steps(n, sum(times))

    run_steps(1)
    step, stopped, just_saved = 1, False, False
    while step < 1_000_000:
        steps_next = checkpoint_every - step % checkpoint_every or checkpoint_every  # to the next checkpoint
        if guard.check(spent, burn, steps_next).stop:
            stopped = True
            break
        run_steps(steps_next)
        step += steps_next
        checkpoint_s = base_ckpt_s * rng.uniform(0.9, 1.1)  # the interval ends with its checkpoint
        pay(checkpoint_s)
        guard.observe_checkpoint(checkpoint_s)
        just_saved = True
    if not just_saved:
        pay(base_ckpt_s * 1.1)  # stopped before any checkpoint: the stop saves one (as slow as it gets)
    pay(teardown_s)
    assert stopped
    assert spent <= budget + 1e-9, (spent, budget)
