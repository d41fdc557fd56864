"""`mmray node ...`: services that run on the cluster's nodes. Parsing only; the work is in mmray.node.spot.

`register(sub)` adds the `node` command to mmray's parser; `main()` is the same command without the rest of the CLI,
run as `python -m mmray.node.spot` by the cluster's start commands.
"""
from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from typing import Callable

WATCH_SPOT_HELP = """\
Watch the cloud's instance metadata for a spot interruption notice and, on one, drain this machine's Ray node
with reason DRAIN_NODE_REASON_PREEMPTION and the deadline that remains, once per notice. Ray Train V2 then hands the
deadline to the training loop (ray.train.get_preemption_info()), which takes an emergency checkpoint. AWS: IMDSv2
spot/instance-action (two minutes), and with --act-on-rebalance the rebalance recommendation. GCP: the
instance/preempted flag (about 30 s). Runs until SIGTERM/SIGINT; logs one line per event on stderr. See
cluster/README.md, "Preemption".
"""
_NODE_ID = re.compile(r"^[0-9a-f]{56}$")


def add_watch_arguments(p: argparse.ArgumentParser) -> None:
    from mmray.node import spot

    p.add_argument("--provider", choices=sorted(spot.DEFAULT_ENDPOINTS), default="aws",
                   help="which metadata service to watch (default aws)")
    p.add_argument("--endpoint", default=None,
                   help=f"metadata service URL (default ${spot.ENDPOINT_ENV}, else {spot.DEFAULT_ENDPOINTS['aws']} "
                        f"on aws, {spot.DEFAULT_ENDPOINTS['gcp']} on gcp)")
    p.add_argument("--interval", type=float, default=None,
                   help=f"seconds between polls (default {spot.DEFAULT_INTERVALS['aws']:g} on aws, "
                        f"{spot.DEFAULT_INTERVALS['gcp']:g} on gcp)")
    p.add_argument("--act-on-rebalance", action="store_true",
                   help="aws: also drain on an EC2 rebalance recommendation (an early warning, not yet an "
                        "interruption: it moves the run off the node at the cost of a restart)")
    p.add_argument("--rebalance-deadline", type=float, default=spot.DEFAULT_REBALANCE_DEADLINE_S,
                   help="seconds of deadline given to Ray for a rebalance recommendation, which has none "
                        f"(default {spot.DEFAULT_REBALANCE_DEADLINE_S:g}, Ray Train's own fallback)")
    p.add_argument("--once", action="store_true",
                   help="poll until one poll succeeds (up to 3 tries), act on a notice, print the summary and exit")
    p.add_argument("--ray-address", default=None,
                   help="GCS address host:port (default $RAY_ADDRESS, else the one `ray start` recorded here)")
    p.add_argument("--node-id", default=None,
                   help="hex id of the Ray node to drain (default $MMRAY_NODE_ID, else the one raylet on this machine)")
    p.add_argument("--pidfile", default=None,
                   help="write the pid here, first stopping the watcher whose pid is there (for start commands that "
                        "may run again)")


def cmd_watch_spot(args: argparse.Namespace) -> dict:
    from mmray.config import ConfigError
    from mmray.node import spot

    try:
        source = spot.make_source(args.provider, args.endpoint, args.act_on_rebalance, args.rebalance_deadline)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    interval = spot.DEFAULT_INTERVALS[args.provider] if args.interval is None else args.interval
    if not interval > 0 or not args.rebalance_deadline > 0:
        raise ConfigError("--interval and --rebalance-deadline must be positive numbers of seconds")
    if args.node_id is not None and not _NODE_ID.match(args.node_id):
        raise ConfigError(f"--node-id must be a Ray node id (56 hex digits), got {args.node_id!r}")

    drain = spot.RayDrainer(address=args.ray_address, node_id=args.node_id)
    watcher = spot.SpotWatcher(source, drain, interval=interval)
    if args.pidfile:
        spot.claim_pidfile(args.pidfile)
    restore = _stop_on_signals(watcher.stop)
    try:
        if not args.once:
            spot.start_preflight(drain)
        summary = watcher.run(once=args.once)
    except (spot.MetadataUnavailable, spot.DrainFailed) as e:  # --once gave up: what failed, without a traceback
        from mmray.cli import CommandFailed

        what = "the drain failed" if isinstance(e, spot.DrainFailed) else "the metadata service is unavailable"
        raise CommandFailed(f"{what} ({watcher.errors} tries): {e}", {"command": "node watch-spot",
                                                                      **watcher.summary()}) from None
    finally:
        restore()
        if args.pidfile:
            spot.release_pidfile(args.pidfile)
    return {"command": "node watch-spot", **summary}


def _stop_on_signals(stop: Callable[[], None]) -> Callable[[], object]:
    """SIGTERM and SIGINT end the watch cleanly (summary printed, pidfile released); returns the undo."""
    saved = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            saved[sig] = signal.signal(sig, lambda *_: stop())
        except ValueError:  # not the main thread: leave signals alone
            pass
    return lambda: [signal.signal(sig, handler) for sig, handler in saved.items()]


def register(sub: argparse._SubParsersAction) -> None:
    """Add `mmray node watch-spot` to mmray's subcommands."""
    node = sub.add_parser("node", help="services that run on cluster nodes (spot interruption watcher)")
    commands = node.add_subparsers(dest="node_command", required=True)
    watch = commands.add_parser("watch-spot", help="drain this Ray node when the cloud announces its preemption",
                                description=WATCH_SPOT_HELP)
    add_watch_arguments(watch)
    watch.set_defaults(fn=cmd_watch_spot)


def main(argv: list[str] | None = None) -> int:
    """`python -m mmray.node.spot [flags]`: the same as `mmray node watch-spot [flags]`."""
    from mmray import cli

    p = argparse.ArgumentParser(prog="python -m mmray.node.spot", description=WATCH_SPOT_HELP)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_watch_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cli.run(cmd_watch_spot, args)
