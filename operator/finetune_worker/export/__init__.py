"""The export worker (`finetune-worker export`): a training result made deployable and published.

pipeline.py runs the stages top to bottom over one ExportRun (context.py: the shared state and the
SIGTERM safe points); its docstring holds the contract (progress lines, SIGTERM, exit codes). Each
stage's work has a module of its own: source (locate), merge + shards (merge), formats, verify,
evaluate (gate), card + plot (card), publish, push; outcome.py turns the way a run ends into the
summary and the exit code.
"""

from .pipeline import run_export

__all__ = ["run_export"]
