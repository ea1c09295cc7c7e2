"""The model card's picture: the training loss over steps (and the eval metrics over steps when the
job had an eval split), drawn from the trainer's log history as a PNG next to the card.

The history comes from final/training.json (`logHistory`, written by training) or, for a result
trained before that field existed, from the newest checkpoint's trainer_state.json.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from finetune_api.contract import CHECKPOINTS_DIR

CURVE_FILE = "training_curve.png"
_NOT_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch", "step")


def log_history(info: dict[str, Any], workspace: Path) -> list[dict[str, Any]]:
    """The trainer's log history for a result: training.json's, else the newest checkpoint's."""
    history = info.get("logHistory")
    if isinstance(history, list) and history:
        return [e for e in history if isinstance(e, dict)]
    newest: tuple[int, Path] | None = None
    for d in (Path(workspace) / CHECKPOINTS_DIR).glob("checkpoint-*"):
        n = d.name.rsplit("-", 1)[-1]
        if n.isdigit() and (d / "trainer_state.json").is_file() and (newest is None or int(n) > newest[0]):
            newest = (int(n), d)
    if newest is None:
        return []
    try:
        state = json.loads((newest[1] / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [e for e in state.get("log_history", []) if isinstance(e, dict)]


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for e in history:
        v, step = e.get(key), e.get("step")
        if isinstance(v, (int, float)) and isinstance(step, int) and math.isfinite(float(v)):
            xs.append(step)
            ys.append(float(v))
    return xs, ys


def eval_keys(history: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for e in history:
        for k in e:
            if k.startswith("eval_") and k not in _NOT_METRICS and k not in keys:
                keys.append(k)
    return keys


def draw_training_curve(history: list[dict[str, Any]], out: Path, title: str) -> dict[str, Any] | None:
    """Write the PNG; returns what it shows ({"lossPoints": n, "evalMetrics": [...]}) or None when the
    history holds no loss to draw."""
    steps, losses = _series(history, "loss")
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")  # headless: pods and CI have no display
    import matplotlib.pyplot as plt

    metrics = [k for k in eval_keys(history) if _series(history, k)[0]]
    fig, axes = plt.subplots(1, 2 if metrics else 1, figsize=(10 if metrics else 6, 3.6), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, losses, marker="o" if len(steps) < 30 else None, markersize=3, color="#1f77b4", label="training loss")
    if "eval_loss" in metrics:
        ax.plot(*_series(history, "eval_loss"), marker="s", markersize=4, color="#d62728", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    others = [k for k in metrics if k != "eval_loss"]
    if metrics:
        ax2 = axes[0][1]
        for k in others or ["eval_loss"]:
            ax2.plot(*_series(history, k), marker="s", markersize=4, label=k.removeprefix("eval_").replace("_", " "))
        ax2.set_xlabel("step")
        ax2.set_title("eval split: " + ("metrics" if others else "loss (own scale)"))
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
    from matplotlib.ticker import MaxNLocator

    for a in axes[0]:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return {"lossPoints": len(steps), "evalMetrics": metrics}


def draw_curves(history: list[dict[str, Any]], dirs: list[Path], title: str) -> dict[str, Any] | None:
    """The curve as a PNG in each of `dirs` (drawn once, copied to the others); what it shows with its
    file name, or None when the history holds no loss to draw."""
    first = dirs[0] / CURVE_FILE
    shown = draw_training_curve(history, first, title)
    if shown is None:
        return None
    for d in dirs[1:]:
        shutil.copyfile(first, d / CURVE_FILE)
    return {**shown, "file": CURVE_FILE}
