"""The budget guard: before each interval of training, continue only if the spend cannot cross the cap.

The rule (:func:`decide`): with ``spent`` dollars spent, the cluster burning ``burn`` $/h, the next interval taking
``next_interval_s`` seconds and a stop (checkpoint, shutdown) taking ``reserve_s``, continue only if

    spent + burn * (next_interval_s + reserve_s) / 3600  <=  budget

Continuing therefore always leaves enough money to checkpoint and stop at the next decision point; stopping now
costs at most ``burn * reserve_s``. So, as long as the interval and the burn rate are not under-estimated, the spend
never crosses the cap. :class:`BudgetGuard` keeps the estimates conservative: the step time is the slowest of the
last few measured intervals times a safety factor, and the stop reserve is the slowest checkpoint seen (times the
same factor) plus a fixed teardown allowance. The guarantee holds provided that (a) step and checkpoint times stay
within the safety factor of the slowest recent measurement, (b) the burn rate does not rise during an interval (a
node added mid-interval is paid for from the next decision on), and (c) the first step, which runs before anything
is measured, and one stop fit in the budget.

Pure Python: no Ray, no torch. The training loop feeds it measurements and asks it before each interval.
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

DEFAULT_SAFETY = 1.25      # step and checkpoint times are multiplied by this before projecting
DEFAULT_TEARDOWN_S = 30.0  # after the last checkpoint: reporting, worker shutdown, the meter's last sample
DEFAULT_WINDOW = 3         # intervals whose slowest step time is used
DEFAULT_CHECKPOINT_GUESS_S = 30.0  # the stop's checkpoint time until one has been measured


@dataclass(frozen=True)
class BudgetDecision:
    """What the guard decided, with the figures that led to it (for logs and the final JSON)."""

    stop: bool
    spent_usd: float
    budget_usd: float
    burn_usd_per_hour: float
    next_interval_s: float
    reserve_s: float
    projected_usd: float  # spend at the end of the next interval plus a stop
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def decide(spent_usd: float, burn_usd_per_hour: float, next_interval_s: float, budget_usd: float,
           reserve_s: float = 0.0) -> BudgetDecision:
    """Continue or checkpoint-and-stop (see the module docstring). ``budget_usd`` 0 means no cap."""
    for name, value in (("spent_usd", spent_usd), ("burn_usd_per_hour", burn_usd_per_hour),
                        ("next_interval_s", next_interval_s), ("budget_usd", budget_usd), ("reserve_s", reserve_s)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    projected = spent_usd + burn_usd_per_hour * (next_interval_s + reserve_s) / 3600.0
    if budget_usd <= 0:
        stop, reason = False, "no budget cap (budget.usd = 0)"
    elif projected <= budget_usd:
        stop, reason = False, (f"${projected:.2f} projected after the next {next_interval_s:.0f} s and a stop, "
                               f"within the ${budget_usd:.2f} budget")
    else:
        stop, reason = True, (f"budget: ${spent_usd:.2f} spent, ${burn_usd_per_hour:.2f}/h; the next "
                              f"{next_interval_s:.0f} s and a stop ({reserve_s:.0f} s) would reach ${projected:.2f}, "
                              f"over the ${budget_usd:.2f} budget: checkpointing and stopping")
    return BudgetDecision(stop, spent_usd, budget_usd, burn_usd_per_hour, next_interval_s, reserve_s, projected,
                          reason)


class BudgetGuard:
    """Conservative step-time and stop-time estimates for :func:`decide`, fed by the training loop.

    Before the first measured step the step time is unknown: :meth:`check` then projects only the stop
    (``next_interval_s`` 0) and says so in the reason. So the loop measures its first step and takes its first
    decision right after it (then before every interval): only that one step runs unprojected. Until a checkpoint
    has been timed, the stop reserve uses ``checkpoint_s_guess``.
    """

    @classmethod
    def for_budget(cls, budget) -> "BudgetGuard":
        """The guard for a config's budget section (mmray.config.BudgetConfig): its cap, teardown and checkpoint
        guess; the training loop and the start-of-run check use the same one."""
        return cls(budget.usd, teardown_s=budget.teardown_s, checkpoint_s_guess=budget.checkpoint_s)

    def __init__(self, budget_usd: float, *, safety: float = DEFAULT_SAFETY, teardown_s: float = DEFAULT_TEARDOWN_S,
                 window: int = DEFAULT_WINDOW, checkpoint_s_guess: float = DEFAULT_CHECKPOINT_GUESS_S):
        if safety < 1:
            raise ValueError(f"safety must be >= 1 (it only ever lengthens estimates), got {safety}")
        self.budget_usd = float(budget_usd)
        self.safety = float(safety)
        self.teardown_s = float(teardown_s)
        self._step_s: deque[float] = deque(maxlen=max(1, int(window)))
        self._checkpoint_s: float | None = None
        self.checkpoint_s_guess = float(checkpoint_s_guess)

    def observe_steps(self, steps: int, seconds: float) -> None:
        """``steps`` optimizer steps took ``seconds`` (wall clock, everything included: data, eval, logging)."""
        if steps > 0 and seconds >= 0:
            self._step_s.append(seconds / steps)

    def observe_checkpoint(self, seconds: float) -> None:
        """One checkpoint save took ``seconds``; the slowest one seen sizes the stop reserve."""
        self._checkpoint_s = max(self._checkpoint_s or 0.0, float(seconds))

    @property
    def step_s(self) -> float | None:
        """The projected seconds per step (slowest recent step time x safety), None before any measurement."""
        return max(self._step_s) * self.safety if self._step_s else None

    @property
    def reserve_s(self) -> float:
        checkpoint_s = self.checkpoint_s_guess if self._checkpoint_s is None else self._checkpoint_s
        return checkpoint_s * self.safety + self.teardown_s

    def check(self, spent_usd: float, burn_usd_per_hour: float, steps_next: int) -> BudgetDecision:
        """Decide before running ``steps_next`` more steps (up to the next decision point)."""
        step_s = self.step_s
        decision = decide(spent_usd, burn_usd_per_hour, (step_s or 0.0) * max(0, steps_next), self.budget_usd,
                          self.reserve_s)
        if step_s is None and not decision.stop and self.budget_usd > 0:
            return BudgetDecision(**{**decision.to_dict(),
                                     "reason": decision.reason + " (no step time measured yet: stop reserve only)"})
        return decision
