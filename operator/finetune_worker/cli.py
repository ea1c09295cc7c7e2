"""`finetune-worker train|export --config FILE --workspace DIR`: the training and export workers
of finetune-operator, run by its pods and runnable by hand.

The config is a FineTuneJob (YAML or JSON), whole or just its spec; `--config -` or the
FINETUNE_CONFIG environment variable may carry it instead of a file. Config errors exit 2
before any heavy import, so a bad spec fails in a second, not after torch loads.

SIGTERM is taken over first thing, before the config is read and before torch loads: a
SIGTERM during start-up or model load is recorded and honoured at the first safe point
(exit 75), never the default death with 143.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_api.contract import CONFIG_ENV, DEFAULT_WORKSPACE, EXIT_INVALID

from .preemption import PreemptionWatch

if TYPE_CHECKING:
    from finetune_api.spec import FineTuneSpec


def _read_config(arg: str | None) -> str:
    from finetune_api.spec import SpecError

    if arg in (None, "") and os.environ.get(CONFIG_ENV):
        return os.environ[CONFIG_ENV]
    if arg in (None, ""):
        raise SpecError("--config", f"no config: pass --config FILE or set {CONFIG_ENV}")
    if arg == "-":
        return sys.stdin.read()
    try:
        return Path(arg).read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError("--config", f"cannot read {arg}: {e.strerror or e}") from None


EPILOG = f"""\
exit codes:
  0   completed (train: final/ published; export: export/ published and verified)
  75  stopped by SIGTERM at a safe point (train: after a checkpoint); run again to resume
  2   invalid input, permanent: a bad field, data that cannot be used, a hub repository that
      does not exist or cannot be read (the message names it and says what to fix)
  1   failure, worth retrying: transient trouble (hub unreachable, timeouts, 5xx, rate
      limits; the message says "transient") or an unexpected error

resume: `train` picks up from the newest valid checkpoint in WORKSPACE/checkpoints/ (damaged
ones are skipped and removed) and says so; run with the same config and workspace after any
interruption. A workspace whose final/ exists is already trained: nothing is redone. `export`
merges WORKSPACE/final/ into WORKSPACE/export/ and skips an export that is already current.

The workspace: inside a pod (Kubernetes) the default is {DEFAULT_WORKSPACE}, the job's volume;
anywhere else pass --workspace DIR."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune-worker", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("train", "train (or resume) from the config"), ("export", "merge and export the result")):
        s = sub.add_parser(name, help=help_, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--config", default=None, help=f"FineTuneJob YAML/JSON file, '-' for stdin (default: ${CONFIG_ENV})")
        s.add_argument("--workspace", default=None,
                       help=f"the job's workspace directory (default inside a pod: {DEFAULT_WORKSPACE})")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("finetune-operator")
    except PackageNotFoundError:
        return "unknown (not installed)"


def default_workspace() -> Path | None:
    """{DEFAULT_WORKSPACE} inside a pod (KUBERNETES_SERVICE_HOST set and the directory there), else None:
    outside a pod nothing is written to a root-level directory by surprise."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and Path(DEFAULT_WORKSPACE).is_dir():
        return Path(DEFAULT_WORKSPACE)
    return None


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    """Run one command. `exiting`: the process ends when this returns (the console script), so the
    SIGTERM watch stays installed: interpreter shutdown with torch loaded takes a while, and a
    SIGTERM then must not turn a finished run into an exit by signal (143)."""
    watch = PreemptionWatch().install()  # first: everything below may be slow (a SIGTERM now still counts)
    try:
        from finetune_api.spec import SpecError, load_config

        from .summary import write_summary

        args = _parser().parse_args(argv)
        workspace = Path(args.workspace) if args.workspace else default_workspace()
        if workspace is None:
            where = "not in a Kubernetes pod" if not os.environ.get("KUBERNETES_SERVICE_HOST") else f"no {DEFAULT_WORKSPACE} here"
            message = (f"--workspace: required outside a pod ({where}): pass --workspace DIR, the directory that "
                       "holds (or will hold) checkpoints/, final/ and export/")
            print(f"finetune-worker: {message}", file=sys.stderr, flush=True)
            return EXIT_INVALID
        try:
            config_text = _read_config(args.config)
            metadata, spec = load_config(config_text)
        except SpecError as e:
            named = str(e).replace('"<unicode string>"', _config_name(args.config)).replace("<unicode string>", _config_name(args.config))
            print(f"finetune-worker: invalid config: {named}", file=sys.stderr, flush=True)
            write_summary({"result": "invalid", "message": named})
            return EXIT_INVALID
        _warn_without_gpu(spec)
        if args.command == "train" and spec.world_size > 1:
            from .launch import launch, under_torchrun

            if not under_torchrun():  # this process becomes torchrun's agent; the ranks run the lines below
                return launch(spec, args.config, config_text, workspace, watch)
        return _run(args.command, spec, metadata, workspace, watch)
    finally:
        if not exiting:  # an in-process caller gets its own signal handling back
            watch.uninstall()


def _config_name(arg: str | None) -> str:
    return arg if arg not in (None, "", "-") else ("stdin" if arg == "-" else f"${CONFIG_ENV}")


def _warn_without_gpu(spec: FineTuneSpec) -> None:
    """Say so when the job asks for GPUs and none is visible (training then runs on CPU, slowly)."""
    if spec.resources.gpus <= 0:
        return
    import torch

    if not torch.cuda.is_available():
        print(f"finetune-worker: warning: spec.resources.gpus is {spec.resources.gpus} but no GPU is available "
              "(torch.cuda.is_available() is false): running on CPU, much more slowly", file=sys.stderr, flush=True)


def _run(command: str, spec: FineTuneSpec, metadata: dict[str, object], workspace: Path,
         watch: PreemptionWatch) -> int:
    if command == "train":
        from .train import run_train

        return run_train(spec, workspace, metadata=metadata, watch=watch)
    from .export import run_export

    return run_export(spec, workspace, metadata=metadata, watch=watch)


def run() -> None:
    """The `finetune-worker` console script."""
    code = main(exiting=True)
    # The outcome is decided and reported. Python restores default handlers late in interpreter
    # shutdown (a Python-level handler becomes SIG_DFL, SIG_IGN stays), so a SIGTERM then (torchrun
    # stopping the other ranks the moment one exits) would turn this exit into a death by signal (-15).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    run()
