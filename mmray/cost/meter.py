"""The cost meter: prices every node of the cluster from its Ray labels and integrates dollars over time.

It runs as a Ray actor on the driver's node (the on-demand head on a cluster), one per run, named after the run
directory. Every ``interval_s`` it lists the nodes (``ray.nodes()``: id, alive, labels) and charges each node for
the time since the previous sample:

- a node is charged from the first sample that sees it alive;
- a node alive at the previous sample is charged up to the current sample, whether it is still alive or has died
  (or vanished) meanwhile: the exact death time is unknown, and the cloud bills until termination anyway. So the
  meter over-counts by at most one interval per departing node, never under-counts a node it saw;
- a node that joins and leaves between two samples is never seen (keep ``interval_s`` well below node lifetimes).

Its state (per-node records, the total, a compact time series, the last training progress) is written after every
sample to ``RUN_DIR/cost.json`` through :mod:`mmray.storage` (atomic locally, one PUT on S3). The actor's lifetime
is the driver's, but its total is not: a new meter on the same run directory (a restarted driver, a resumed run)
restores the file and continues it. After a crash (no clean :meth:`CostMeter.stop`), a node that was alive at the
last saved sample and is still alive at the first new one is charged across the gap (node ids are unique per
raylet, so it was up all along, billing the run); one that is gone is closed at the last saved sample. After a
clean stop (the run ended, or stopped for its budget) nothing is charged for the time between the runs. Nothing is
counted twice and nothing resets.

The training loop also hands the meter each preemption it went through (:meth:`CostMeter.record_preemption`:
when the notice came, how much notice there was, whether the emergency checkpoint finished before the deadline,
and how many steps were lost), kept in cost.json beside the dollars those nodes cost.

Prices come from :mod:`mmray.cost.prices` (labels ``mmray/instance-type`` + ``ray.io/market-type``; unlabelled
nodes are priced as the ``local`` entry, $0 unless overridden). The meter charges its run for the WHOLE cluster:
run one budgeted job per cluster (a sweep counts as one job).

The node listing and the clock are injectable (``list_nodes``, ``clock``), so join/leave arithmetic is testable
with exact dollars. :class:`CostMeter` is a plain class; :func:`start_meter` makes it a Ray actor.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Callable

from mmray import storage
from mmray.cost import prices as prices_lib

log = logging.getLogger("mmray")

COST_FILE = "cost.json"
VERSION = 1
ACTOR_NAMESPACE = "mmray"
DEFAULT_INTERVAL_S = 30.0
MAX_SERIES = 512        # points kept in the time series; older ones are thinned, first and last always kept
MAX_CLOSED_NODES = 256  # records of departed nodes kept individually; older ones are folded into one total

NodeLister = Callable[[], list[dict]]  # -> [{"node_id": str, "alive": bool, "labels": {str: str}}]
Clock = Callable[[], float]            # -> seconds since the epoch (wall clock: it must survive restarts)


def cost_path(run_dir: str) -> str:
    return storage.join(run_dir, COST_FILE)


def actor_name(run_dir: str) -> str:
    """One meter per run directory (a hash, since actor names must be short and path-free)."""
    return "mmray-cost-" + hashlib.sha256(run_dir.encode()).hexdigest()[:16]


def ray_nodes() -> list[dict]:
    """Every node the GCS knows, alive or dead, with its labels (Ray 2.60: ``ray.nodes()[i]["Labels"]``)."""
    import ray

    return [{"node_id": n["NodeID"], "alive": bool(n.get("Alive")), "labels": dict(n.get("Labels") or {})}
            for n in ray.nodes()]


def read_state(run_dir: str) -> dict | None:
    """The saved meter state of a run, or None when the run has none yet."""
    path = cost_path(run_dir)
    if not storage.exists(path):
        return None
    try:
        state = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise storage.StorageError(f"{path} is not valid JSON ({e}); move it away to restart metering") from None
    if state.get("version") != VERSION:
        raise storage.StorageError(f"{path} has version {state.get('version')!r}, this mmray reads {VERSION}")
    return state


def forecast(spent_usd: float, burn_usd_per_hour: float, remaining_samples: float, samples_per_s: float,
             budget_usd: float = 0.0) -> dict:
    """Time and dollars to finish at the current burn rate and throughput (None when the throughput is unknown)."""
    if samples_per_s <= 0:
        return {"remaining_samples": remaining_samples, "seconds": None, "usd": None, "total_usd": None,
                "over_budget": None}
    seconds = max(remaining_samples, 0) / samples_per_s
    usd = burn_usd_per_hour * seconds / 3600.0
    total = spent_usd + usd
    return {"remaining_samples": remaining_samples, "seconds": seconds, "usd": usd, "total_usd": total,
            "over_budget": bool(budget_usd > 0 and total > budget_usd)}


class CostMeter:
    """See the module docstring. Thread-safe: the background sampler and callers share one lock."""

    def __init__(self, run_dir: str, *, budget_usd: float = 0.0, prices_path: str = "",
                 interval_s: float = DEFAULT_INTERVAL_S, list_nodes: NodeLister | None = None,
                 clock: Clock | None = None, autostart: bool = False, max_series: int = MAX_SERIES):
        self.run_dir = run_dir
        self.budget_usd = float(budget_usd)
        self.interval_s = float(interval_s)
        self.prices = prices_lib.load(prices_path)
        self._list_nodes = list_nodes or ray_nodes
        self._clock = clock or time.time
        self._max_series = max(4, int(max_series))
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nodes: dict[str, dict] = {}
        self._carried: set[str] = set()  # restored as alive: charged across the gap only if still alive
        self._folded_usd = 0.0           # dollars of departed nodes whose records were dropped
        self._series: list[list[float]] = []
        self._progress: dict | None = None
        self._preemptions: list[dict] = []
        self._last_t: float | None = None
        self._started_at: float | None = None
        self._restarts = 0
        self._stopped = False
        saved = read_state(run_dir)
        if saved:
            self._restore(saved)
        if autostart:
            self.start()

    # ------------------------------------------------------------------------------------------------ state

    def _restore(self, saved: dict) -> None:
        self._nodes = {k: dict(v) for k, v in saved.get("nodes", {}).items()}
        if saved.get("stopped"):  # a clean end: the time between the runs is not the run's
            for rec in self._nodes.values():
                rec["alive"] = False
        self._carried = {k for k, v in self._nodes.items() if v.get("alive")}
        self._folded_usd = float(saved.get("folded_usd", 0.0))
        self._series = [list(p) for p in saved.get("series", [])]
        self._progress = saved.get("progress")
        self._preemptions = [dict(p) for p in saved.get("preemptions", [])]
        self._last_t = saved.get("updated_at")
        self._started_at = saved.get("started_at")
        self._restarts = int(saved.get("restarts", 0)) + 1  # the budget is the new run's (a rerun may raise it)
        log.info("cost meter: continuing %s from $%.4f (%d nodes on record)", cost_path(self.run_dir),
                 self._spent(), len(self._nodes))

    def _spent(self) -> float:
        return self._folded_usd + sum(n["usd"] for n in self._nodes.values())

    def _burn(self) -> float:
        return sum(n["usd_per_hour"] for k, n in self._nodes.items() if n["alive"] and k not in self._carried)

    def state(self) -> dict:
        """Everything cost.json holds."""
        with self._lock:
            return {"version": VERSION, "run_dir": self.run_dir, "budget_usd": self.budget_usd,
                    "spent_usd": self._spent(), "burn_usd_per_hour": self._burn(),
                    "interval_s": self.interval_s, "started_at": self._started_at, "updated_at": self._last_t,
                    "restarts": self._restarts, "stopped": self._stopped, "folded_usd": self._folded_usd,
                    "prices": {"as_of": self.prices.as_of, "source": self.prices.source, "path": self.prices.path},
                    "unpriced": sorted({n["instance_type"] for n in self._nodes.values()
                                        if n["priced_by"] == "unknown-type"}),
                    "progress": self._progress, "preemptions": self._preemptions, "nodes": self._nodes,
                    "series": self._series}

    def _persist(self) -> None:
        try:
            storage.write_text(cost_path(self.run_dir), json.dumps(self.state(), indent=1, sort_keys=True))
        except OSError as e:  # a transient storage failure must not stop the meter; the next sample retries
            log.warning("cost meter: could not write %s: %s", cost_path(self.run_dir), e)

    # ------------------------------------------------------------------------------------------------ sampling

    def sample(self) -> dict:
        """List the nodes once, charge them up to now, save cost.json; returns :meth:`status`. After a clean stop
        (:meth:`stop`) a late caller's sample (a checkpoint's, say) changes nothing: the record stays a clean end."""
        with self._lock:
            if self._stopped:
                return self.status()
            now = float(self._clock())
            listing = {n["node_id"]: n for n in self._list_nodes()}
            if self._started_at is None:
                self._started_at = now
            for node_id, rec in self._nodes.items():
                if not rec["alive"]:
                    continue
                seen = listing.get(node_id)
                alive_now = bool(seen and seen["alive"])
                if node_id in self._carried and not alive_now:
                    rec["alive"] = False  # gone while nobody metered: closed at the last saved sample
                    continue
                rec["usd"] += rec["usd_per_hour"] * max(0.0, now - rec["charged_until"]) / 3600.0
                rec["charged_until"] = now
                if alive_now:
                    rec["last_seen_alive"] = now
                else:
                    rec["alive"] = False
            self._carried.clear()
            self._stopped = False
            for node_id, seen in listing.items():
                rec = self._nodes.get(node_id)
                if seen["alive"] and rec is not None and not rec["alive"]:
                    # Only after a clean stop: a Ray node never comes back to life. Charged again from now.
                    rec.update(alive=True, charged_until=now, last_seen_alive=now)
                elif seen["alive"] and rec is None:
                    price = self.prices.price_node(seen.get("labels") or {})
                    if price.priced_by == "unknown-type":
                        log.warning("cost meter: instance type %r is not in the price table; pricing node %s at "
                                    "the highest on-demand price, $%.2f/h", price.instance_type, node_id,
                                    price.usd_per_hour)
                    self._nodes[node_id] = {
                        "instance_type": price.instance_type, "market": price.market,
                        "usd_per_hour": price.usd_per_hour, "priced_by": price.priced_by,
                        "first_seen": now, "last_seen_alive": now, "charged_until": now, "usd": 0.0, "alive": True}
            self._last_t = now
            self._fold_departed()
            self._series.append([now, self._spent(), self._burn()])
            if len(self._series) > self._max_series:
                self._series = self._series[:-1:2] + self._series[-1:]
            self._persist()
            return self.status()

    def _fold_departed(self) -> None:
        closed = [k for k, n in self._nodes.items() if not n["alive"]]
        for node_id in closed[:max(0, len(closed) - MAX_CLOSED_NODES)]:
            self._folded_usd += self._nodes.pop(node_id)["usd"]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # keep metering through a transient GCS or storage failure
                log.exception("cost meter: sample failed")

    def start(self) -> dict:
        """Sample now, then every ``interval_s`` in a background thread (idempotent; after :meth:`stop`, metering
        starts again)."""
        with self._lock:
            self._stopped = False
        status = self.sample()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="mmray-cost-meter", daemon=True)
            self._thread.start()
        return status

    def stop(self) -> dict:
        """Stop the background sampler and take a final sample, saved as a clean end (a later meter on this run
        directory charges nothing for the time in between); returns :meth:`status`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
            self._thread = None
        with self._lock:
            self.sample()
            self._stopped = True
            self._persist()
            return self.status()

    # ------------------------------------------------------------------------------------------------ queries

    def spent_usd(self) -> float:
        """Dollars so far, including what the nodes alive at the last sample have cost since it."""
        with self._lock:
            if self._last_t is None or self._stopped:  # after stop() nothing runs on this run's account
                return self._spent()
            return self._spent() + self._burn() * max(0.0, float(self._clock()) - self._last_t) / 3600.0

    def burn_usd_per_hour(self) -> float:
        """What the nodes alive at the last sample cost per hour together."""
        with self._lock:
            return self._burn()

    def forecast(self, remaining_samples: float, samples_per_s: float) -> dict:
        """Seconds and dollars to train ``remaining_samples`` more at ``samples_per_s`` and the current burn."""
        return forecast(self.spent_usd(), self.burn_usd_per_hour(), remaining_samples, samples_per_s,
                        self.budget_usd)

    def report_progress(self, samples_seen: int, samples_per_s: float, total_samples: int, save: bool = True) -> dict:
        """Record the training progress (for `mmray cost`'s forecast): saved with the next sample, and now when
        ``save`` (the training loop reports at every log line, too often for a write to S3 each time)."""
        with self._lock:
            self._progress = {"t": float(self._clock()), "samples_seen": int(samples_seen),
                              "samples_per_s": float(samples_per_s), "total_samples": int(total_samples)}
            if save:
                self._persist()
        return self.forecast(total_samples - samples_seen, samples_per_s)

    def record_preemption(self, record: dict) -> dict:
        """Keep one preemption record (the training loop's, see ``mmray.train.checkpoint``), saved now.

        A notice is reported twice, once after its emergency checkpoint and again, completed, when the run resumes;
        records are matched by their ``notice_at`` and the later one wins. The record gains ``usd_per_hour`` of
        the preempted nodes the meter knows, for what the lost capacity cost.
        """
        rec = dict(record)
        with self._lock:
            known = [self._nodes[n] for n in rec.get("nodes") or [] if n in self._nodes]
            rec["usd_per_hour"] = sum(n["usd_per_hour"] for n in known) if known else None
            rec["markets"] = sorted({n["market"] for n in known})
            for i, old in enumerate(self._preemptions):
                if old.get("notice_at") == rec.get("notice_at"):  # a later report adds, never erases
                    self._preemptions[i] = {**old, **{k: v for k, v in rec.items() if v is not None}}
                    break
            else:
                self._preemptions.append(rec)
            self._persist()
            return rec

    def preemptions(self) -> list[dict]:
        with self._lock:
            return [dict(p) for p in self._preemptions]

    def status(self) -> dict:
        """The figures the budget guard and `mmray cost` need, in one call."""
        with self._lock:
            alive = [n for k, n in self._nodes.items() if n["alive"] and k not in self._carried]
            return {"spent_usd": self.spent_usd(), "burn_usd_per_hour": self._burn(), "budget_usd": self.budget_usd,
                    "nodes_alive": len(alive), "nodes_seen": len(self._nodes), "updated_at": self._last_t,
                    "restarts": self._restarts,
                    "unpriced": sorted({n["instance_type"] for n in alive if n["priced_by"] == "unknown-type"})}


def start_meter(run_dir: str, *, budget_usd: float = 0.0, prices_path: str = "",
                interval_s: float = DEFAULT_INTERVAL_S, list_nodes: NodeLister | None = None,
                clock: Clock | None = None, autostart: bool = True):
    """The run's meter as a Ray actor: created on the caller's node (the head, for a driver there), or the running
    one when this run already has one (then the arguments are ignored).

    Zero CPUs, so it never takes a slot from training. Not detached: it ends with the driver, and its successor
    continues from cost.json. Ray restarts it after a crash (its __init__ restores the file and resumes sampling).
    """
    import ray
    here = ray.get_runtime_context().get_node_id()
    return ray.remote(CostMeter).options(
        name=actor_name(run_dir), namespace=ACTOR_NAMESPACE, get_if_exists=True, num_cpus=0, max_restarts=-1,
        label_selector={"ray.io/node-id": here},  # a soft node affinity is ignored for zero-CPU actors
    ).remote(run_dir, budget_usd=budget_usd, prices_path=prices_path, interval_s=interval_s, list_nodes=list_nodes,
             clock=clock, autostart=autostart)


def get_meter(run_dir: str):
    """The running meter of ``run_dir`` (e.g. from a training worker), or None."""
    import ray

    try:
        return ray.get_actor(actor_name(run_dir), namespace=ACTOR_NAMESPACE)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------- reporting

def report(run_dir: str, now: float | None = None) -> dict:
    """`mmray cost`'s summary from a run's cost.json: spend, burn, forecast from the last reported progress.

    ``spent_usd`` is the figure at the last sample (``updated_at``); while a meter is running the cluster keeps
    spending, so ``spent_usd_now`` adds the burn since then (an estimate: nodes may have left meanwhile). After a
    clean stop (``stopped``) the run spends nothing more: the two are equal, the burn and the nodes alive are 0, and
    ``last_burn_usd_per_hour`` (which the forecast to finish uses) is the burn when it stopped.
    """
    state = read_state(run_dir)
    if state is None:
        raise storage.StorageError(f"no {COST_FILE} under {run_dir}: the run has not been metered (yet)")
    now = time.time() if now is None else now
    age = max(0.0, now - (state["updated_at"] or now))
    stopped = bool(state.get("stopped"))
    running_for = 0.0 if stopped else age
    alive = sum(1 for n in state["nodes"].values() if n["alive"])  # at the last sample (the stop's, if stopped)
    out = {"run_dir": run_dir, "spent_usd": state["spent_usd"],
           "burn_usd_per_hour": 0.0 if stopped else state["burn_usd_per_hour"],
           "last_burn_usd_per_hour": state["burn_usd_per_hour"],
           "spent_usd_now": state["spent_usd"] + state["burn_usd_per_hour"] * running_for / 3600.0,
           "stopped": stopped,
           "budget_usd": state["budget_usd"], "updated_at": state["updated_at"], "age_s": age,
           "started_at": state["started_at"], "restarts": state["restarts"],
           "nodes_alive": 0 if stopped else alive, "nodes_at_stop": alive if stopped else None,
           "nodes_seen": len(state["nodes"]), "unpriced": state["unpriced"], "prices": state["prices"],
           "progress": state["progress"], "preemptions": state.get("preemptions", []), "forecast": None}
    p = state["progress"]
    if p:
        out["forecast"] = forecast(state["spent_usd"], state["burn_usd_per_hour"],
                                   p["total_samples"] - p["samples_seen"], p["samples_per_s"], state["budget_usd"])
    return out


def plot(run_dir: str, out_png: str) -> str:
    """Spend over time against the budget (and the forecast to finish, when known) as a PNG at ``out_png``."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and in CI
    import matplotlib.pyplot as plt

    state = read_state(run_dir)
    if state is None:
        raise storage.StorageError(f"no {COST_FILE} under {run_dir}: nothing to plot")
    series = state["series"]
    t0 = state["started_at"] or (series[0][0] if series else 0.0)
    hours = [(t - t0) / 3600.0 for t, _, _ in series]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(hours, [s for _, s, _ in series], label="spent", color="tab:blue")
    summary = report(run_dir, now=series[-1][0] if series else None)
    fc = summary["forecast"]
    if fc and fc["seconds"] is not None and series:
        end = hours[-1] + fc["seconds"] / 3600.0
        ax.plot([hours[-1], end], [series[-1][1], fc["total_usd"]], "--", color="tab:blue", label="forecast")
    if state["budget_usd"] > 0:
        ax.axhline(state["budget_usd"], color="tab:red", label=f"budget ${state['budget_usd']:.2f}")
    ax.set_xlabel("hours since the meter started")
    ax.set_ylabel("USD")
    ax.set_title(f"{run_dir}: ${state['spent_usd']:.2f} spent, ${state['burn_usd_per_hour']:.2f}/h", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(out_png, buf.getvalue())
    return out_png
