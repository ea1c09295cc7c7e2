"""Training data: read (jsonl, csv, parquet, save_to_disk dir, hub, inline), map columns, validate.

Every problem a user can fix (unreadable file, missing column, a CoSENT score that is not a
number) raises InvalidInput naming the file, the column and, where it helps, the row.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.remote import is_s3
from finetune_api.spec import LOSS_COLUMNS, FineTuneSpec

from .errors import InvalidInput

if TYPE_CHECKING:
    from datasets import Dataset

TSDAE_NOISY = "noisy"  # the damaged copy DenoisingAutoEncoderLoss reads first


@dataclass
class TrainingData:
    train: Dataset
    eval: Dataset | None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InvalidInput(f"{path}: line {n} is not JSON ({e})") from None
            if not isinstance(row, dict):
                raise InvalidInput(f"{path}: line {n} is not a JSON object")
            rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def _records_to_dataset(rows: list[dict[str, Any]] | tuple[dict[str, Any], ...], where: str) -> Dataset:
    from datasets import Dataset

    if not rows:
        raise InvalidInput(f"{where}: no records")
    try:
        return Dataset.from_list(list(rows))
    except Exception as e:  # pyarrow refuses mixed types within a column
        raise InvalidInput(f"{where}: records do not form a table ({e})") from None


def read_table(path_text: str, workspace: Path, split: str = "train") -> Dataset:
    """Read a data file or `save_to_disk` directory named relative to the workspace (or absolute).

    Raises:
        InvalidInput: the path is missing, unreadable, empty or of an unknown format.
    """
    if is_s3(path_text):  # downloaded once into the workspace cache, checked unchanged (objectstore.py)
        from .objectstore import fetch_file

        path_text = str(fetch_file(path_text, workspace, "spec.dataset"))
    path = Path(path_text) if Path(path_text).is_absolute() else Path(workspace) / path_text
    if not path.exists():
        raise InvalidInput(f"spec.dataset: data file {path_text!r} not found (looked at {path})")
    try:
        if path.is_dir():
            from datasets import DatasetDict, load_from_disk

            ds = load_from_disk(str(path))
            if isinstance(ds, DatasetDict):
                if split not in ds:
                    raise InvalidInput(f"{path}: no split {split!r} (has: {', '.join(ds)})")
                ds = ds[split]
            return ds
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return _records_to_dataset(_read_jsonl(path), str(path))
        if suffix in (".csv", ".tsv"):
            return _records_to_dataset(_read_csv(path), str(path))
        if suffix == ".parquet":
            from datasets import Dataset

            return Dataset.from_parquet(str(path))
    except InvalidInput:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InvalidInput(f"spec.dataset: cannot read {path}: {e}") from None
    except Exception as e:  # pyarrow / datasets raise their own types on a damaged file
        raise InvalidInput(f"spec.dataset: cannot read {path}: {type(e).__name__}: {e}") from None
    raise InvalidInput(f"spec.dataset: unknown data format {path.suffix!r} for {path} (use .jsonl, .csv, .parquet "
                       "or a datasets save_to_disk directory)")


def _read_hub(name: str, split: str) -> Dataset:
    """A hub dataset's split. Failures are classed as hubfetch says: not found / denied / gated exit 2,
    unreachable / timeout / 5xx exit 1 (retried); anything else about the data is invalid input."""
    from .hubfetch import check_repo, classify

    check_repo(name, "dataset", "spec.dataset.hub")
    try:
        from datasets import load_dataset

        return load_dataset(name, split=split)
    except Exception as e:
        classified = classify(e, name, "dataset", "spec.dataset.hub")
        if classified is not None:
            raise classified from None
        raise InvalidInput(f"spec.dataset.hub: cannot load {name!r} split {split!r}: {e}") from None


def required_columns(spec: FineTuneSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return LOSS_COLUMNS[spec.training.inner_loss]


def map_columns(ds: Dataset, spec: FineTuneSpec, where: str) -> Dataset:
    """Select and rename the file's columns to the loss's model-side names, in the loss's order.

    Raises:
        InvalidInput: a required (or explicitly mapped) column is missing, or a score is not a number.
    """
    required, optional = required_columns(spec)
    mapping = spec.dataset.columns
    have = list(ds.column_names)
    chosen: list[tuple[str, str]] = []  # (model-side, file-side)
    for name in (*required, *optional):
        src = mapping.get(name, name)
        if src in have:
            chosen.append((name, src))
        elif name in required or name in mapping:
            hint = f" (spec.dataset.columns.{name} maps it to {src!r})" if name in mapping else \
                f" (map it with spec.dataset.columns.{name}: <your column>)"
            raise InvalidInput(f"{where}: {spec.training.inner_loss} needs column {name!r}; "
                               f"no column {src!r} in the data{hint}; columns are: {', '.join(have)}")
    ds = ds.select_columns([src for _, src in chosen])
    renames = {src: name for name, src in chosen if src != name}
    if renames:
        # two-step rename so swapping names (anchor<->positive) cannot collide
        tmp = {src: f"__ft_{name}" for src, name in renames.items()}
        ds = ds.rename_columns(tmp).rename_columns({f"__ft_{name}": name for name in renames.values()})
    if "score" in ds.column_names:
        ds = _float_scores(ds, where, mapping.get("score", "score"))
    for name in ds.column_names:
        if name != "score":
            _check_text(ds, name, where)
    return ds


def _check_text(ds: Dataset, name: str, where: str) -> None:
    for i, v in enumerate(ds[name]):
        if not isinstance(v, str):
            raise InvalidInput(f"{where}: column {name!r} must hold text; row {i} has {type(v).__name__} {str(v)[:40]!r}")


def _float_scores(ds: Dataset, where: str, file_name: str) -> Dataset:
    from datasets import Value

    values = ds["score"]
    out: list[float] = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or v is None:
            x = math.nan
        elif isinstance(v, (int, float)):
            x = float(v)
        else:
            try:
                x = float(str(v).strip())
            except ValueError:
                x = math.nan
        if not math.isfinite(x):
            raise InvalidInput(f"{where}: CoSENTLoss needs a float score column; column {file_name!r} row {i} "
                               f"holds {v!r}")
        out.append(x)
    ds = ds.remove_columns("score").add_column("score", out)
    return ds.cast_column("score", Value("float32"))


def add_tsdae_noise(ds: Dataset, seed: int, delete_ratio: float) -> Dataset:
    """Add the damaged copy TSDAE reconstructs from: each word kept with probability 1 - ratio.

    The noise of row i depends only on (seed, i), so a resumed run sees the same inputs.
    """
    def noise(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        noisy = []
        for idx, text in zip(indices, batch["text"], strict=True):
            rng = random.Random(f"{seed}:{idx}")
            words = text.split()
            kept = [w for w in words if rng.random() >= delete_ratio]
            if not kept and words:
                kept = [words[rng.randrange(len(words))]]
            noisy.append(" ".join(kept))
        return {TSDAE_NOISY: noisy, "text": batch["text"]}

    ds = ds.map(noise, batched=True, with_indices=True)
    return ds.select_columns([TSDAE_NOISY, "text"])


def read_training_rows(spec: FineTuneSpec, workspace: Path) -> tuple[Dataset, str]:
    """The training data as stored (file-side column names), and how to name it in messages.

    Raises:
        InvalidInput: unreadable or empty.
    """
    d = spec.dataset
    if d.inline is not None:
        raw, where = _records_to_dataset(d.inline, "spec.dataset.inline"), "spec.dataset.inline"
    elif d.hub is not None:
        raw, where = _read_hub(d.hub, d.split), f"dataset {d.hub}"
    else:
        raw, where = read_table(str(d.path), workspace, d.split), f"spec.dataset.path {d.path}"
    if len(raw) == 0:
        raise InvalidInput(f"{where}: no rows")
    return raw, where


def split_eval_fraction(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, eval): the seeded held-out split of spec.dataset.eval.fraction. The export's evaluation
    gate calls this too, so it scores exactly the rows training held out (the split depends only on
    the row count and the seed, not on the columns).

    Raises:
        InvalidInput: the fraction leaves nothing to train on.
    """
    n_eval = max(1, round(len(ds) * fraction))
    if n_eval >= len(ds):
        raise InvalidInput(f"spec.dataset.eval.fraction: {fraction} of {len(ds)} rows leaves nothing to train on")
    split = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]


def load_training_data(spec: FineTuneSpec, workspace: Path) -> TrainingData:
    """Read, map and split the training (and eval) data of a spec.

    Raises:
        InvalidInput: anything wrong with the data, named by file and column.
    """
    d = spec.dataset
    raw, where = read_training_rows(spec, workspace)
    train = map_columns(raw, spec, where)
    ev = None
    if d.eval is not None:
        if d.eval.fraction is not None:
            train, ev = split_eval_fraction(train, d.eval.fraction, spec.training.seed)
        elif d.eval.inline is not None:
            ev = map_columns(_records_to_dataset(d.eval.inline, "spec.dataset.eval.inline"), spec, "spec.dataset.eval.inline")
        elif d.eval.path is not None:
            ev = map_columns(read_table(d.eval.path, workspace, d.split), spec, f"spec.dataset.eval.path {d.eval.path}")
    if spec.training.loss == "DenoisingAutoEncoderLoss":
        ratio = float(spec.training.loss_params.get("noiseDeleteRatio", 0.6))
        train = add_tsdae_noise(train, spec.training.seed, ratio)
        if ev is not None:
            ev = add_tsdae_noise(ev, spec.training.seed + 1, ratio)
    return TrainingData(train=train, eval=ev)
