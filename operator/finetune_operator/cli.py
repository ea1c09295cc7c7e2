"""`finetune-operator run` (the kopf operator) and `finetune-operator local FILE` (no cluster)."""

from __future__ import annotations

import argparse
import logging
import sys


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
    run.add_argument("-v", "--verbose", action="store_true")
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


def run_operator(namespaces: list[str], liveness_port: int, metrics_port: int, verbose: bool) -> int:
    import kopf

    from . import handlers, metrics

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    if metrics_port:
        metrics.serve(metrics_port)
    del handlers  # imported for its handlers' registration
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,  # one replica, Recreate: no peering objects needed
        liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "local":
        from .local import main as local_main

        return local_main(args.file, args.workdir, args.timeout)
    return run_operator(args.namespace, args.liveness_port, args.metrics_port, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
