"""`finetune-operator run` (the kopf operator) and `finetune-operator local FILE` (no cluster)."""

from __future__ import annotations

import argparse
import gc
import getpass
import logging
import os
import random
import socket
import sys
import time
from typing import Any, cast


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("finetune-operator")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune-operator", description="Fine-tune embedding models on Kubernetes."
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator against a cluster (kopf)")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="serve this namespace (repeatable; globs allowed)")  # fmt: skip
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace (default)")
    run.add_argument(
        "--liveness-port", type=int, default=8080, help="kopf liveness probe at :PORT/healthz (0: off)"
    )
    run.add_argument(
        "--metrics-port", type=int, default=9090, help="Prometheus metrics at :PORT/metrics (0: off)"
    )
    run.add_argument("--peering", metavar="NAME", default=os.environ.get("FINETUNE_PEERING") or None,
                     help="HA: run as one of several replicas that share the ClusterKopfPeering NAME (created if "
                          "missing; its CRD is in manifests/peering): the oldest live replica is active, the "
                          "others stand by (default: env FINETUNE_PEERING; unset: standalone, one process)")  # fmt: skip
    run.add_argument("--priority", type=int, default=None,
                     help="peering priority (highest is active; default: earlier start = higher, so a "
                          "restarted or new replica never preempts the active one)")  # fmt: skip
    run.add_argument("-v", "--verbose", action="store_true", help="DEBUG logs: every pass, kopf's handler lines")
    run.add_argument("--log-format", choices=("full", "plain", "json"), default="full",
                     help="one line per transition or error: full (time, logger, level), plain, or json "
                          "(one object per line, with the object's namespace/name where known)")  # fmt: skip
    local = sub.add_parser(
        "local", help="run FineTuneJobs end to end on this machine, pods as local processes"
    )
    local.add_argument("file", nargs="+", help="FineTuneJob YAML files (e.g. manifests/samples/...); several "
                                               "run together, so a spec.model.fromJob finds its source")  # fmt: skip
    local.add_argument(
        "--workdir", default=None, help="where the workspaces live (default: ./.finetune/<first job's name>)"
    )
    local.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    return p


def start_priority(now: float | None = None) -> int:
    """A peering priority that falls with the start time (milliseconds; a random tie-break): kopf
    pauses every replica when two share a priority, and pauses the active one when a higher one
    appears, so the longest-running replica must stay the highest."""
    ms = int((time.time() if now is None else now) * 1000)
    return (10**13 - ms) * 1000 + random.SystemRandom().randrange(1000)


# With 500 jobs created at once, CPython's collector took 1.4 of the operator's 6.5 CPU-seconds
# (timed with gc.callbacks, bench_apiserver.py (b)): a young collection every 700 allocations, so
# an older one every few watch events, each walking every module, class and generated model that
# kopf and kubernetes_asyncio had loaded, then the whole cache. Tuned: 0.52 of 4.8 s.
YOUNG_GC_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)


def tune_gc() -> None:
    """Freeze what is loaded so far (never garbage: out of every later collection's walk) and
    collect the young generation less often. Cycles among later objects are still collected."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)


def peering_identity(now: float | None = None) -> str:
    """This replica's name among its peers. In a pod: the pod's name (POD_ID from the downward
    API, as kopf documents; unique, and what `kubectl get clusterkopfpeering -o yaml` should show).
    Elsewhere: user@host/start, as kopf would name it, except that a uid with no passwd entry
    (the operator image's 65532, an OpenShift arbitrary uid) is named by number: kopf's own
    getpass.getuser() raises KeyError for it, and every replica crashed at start."""
    pod = os.environ.get("POD_ID")
    if pod:
        return pod
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid-{os.getuid()}"
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{user}@{socket.gethostname()}/{stamp}/{random.SystemRandom().randrange(16**4):04x}"


# The top-level modules of the [operator] extra (pyproject.toml): only a missing one of these is a
# missing extra; any other ModuleNotFoundError is a bug and is raised as such.
OPERATOR_EXTRA_MODULES = frozenset({"kopf", "aiohttp", "kubernetes_asyncio", "prometheus_client"})


def run_operator(namespaces: list[str], liveness_port: int, metrics_port: int, verbose: bool,
                 log_format: str = "full", peering: str | None = None, priority: int | None = None) -> int:  # fmt: skip
    try:  # the [operator] extra: absent where only the worker is installed (the worker image)
        import kopf

        from finetune_operator.cluster import handlers, metrics
    except ModuleNotFoundError as e:
        if e.name not in OPERATOR_EXTRA_MODULES:
            raise
        raise SystemExit(
            f"finetune-operator run: {e.name} is not installed: pip install 'finetune-operator[operator]'"
        ) from e

    kopf.configure(verbose=verbose, log_format=kopf.LogFormat[log_format.upper()], log_refkey="object")
    for handler in logging.getLogger().handlers:
        handler.addFilter(handlers.QUIET_SUCCESS)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if metrics_port:
        metrics.serve(metrics_port)
    tune_gc()
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=not peering,
        peering_name=peering or None,
        priority=(priority if priority is not None else start_priority()) if peering else None,
        # kopf types it as its private NewType Identity (a str); without it, kopf names the replica
        # with getpass.getuser(), which raises for a uid with no passwd entry
        identity=cast(Any, peering_identity()) if peering else None,
        liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "local":
        from finetune_operator.local.runner import main as local_main

        return local_main(args.file, args.workdir, args.timeout)
    return run_operator(args.namespace, args.liveness_port, args.metrics_port, args.verbose, args.log_format,
                        args.peering, args.priority)


if __name__ == "__main__":
    sys.exit(main())
