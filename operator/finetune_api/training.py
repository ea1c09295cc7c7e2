"""The training part of a FineTuneJob spec: `spec.training` (loss and its parameters, schedule,
precision, checkpoints) and `spec.lora`. Pure; spec.py's parser calls these and re-exports the
names its readers import (`LOSS_COLUMNS`, `TrainingSpec`, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune_api.fields import _NO_SPACE, SpecError, _kind, _Obj, _show, did_you_mean

LOSSES = (
    "MultipleNegativesRankingLoss",
    "CachedMultipleNegativesRankingLoss",
    "CoSENTLoss",
    "MatryoshkaLoss",
    "DenoisingAutoEncoderLoss",
)
# Losses MatryoshkaLoss may wrap.
INNER_LOSSES = ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss", "CoSENTLoss")
# Model-side columns each loss reads; the first tuple is required, the second optional.
LOSS_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "MultipleNegativesRankingLoss": (("anchor", "positive"), ("negative",)),
    "CachedMultipleNegativesRankingLoss": (("anchor", "positive"), ("negative",)),
    "CoSENTLoss": (("anchor", "positive", "score"), ()),
    "DenoisingAutoEncoderLoss": (("text",), ()),
}
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class CheckpointSpec:
    every_steps: int = 100
    keep: int = 3
    on_preemption: bool = True


@dataclass(frozen=True)
class TrainingSpec:
    loss: str = "MultipleNegativesRankingLoss"
    loss_params: dict[str, Any] = field(default_factory=dict)
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    learning_rate: float = 2.0e-5
    warmup_ratio: float = 0.1
    seed: int = 42
    precision: str = "fp32"
    max_seq_length: int | None = None
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)

    @property
    def inner_loss(self) -> str:
        """The loss that reads the columns (MatryoshkaLoss wraps another)."""
        if self.loss == "MatryoshkaLoss":
            return str(self.loss_params.get("innerLoss", "MultipleNegativesRankingLoss"))
        return self.loss


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None
    use_rslora: bool = False


def _checkpoint(o: _Obj) -> CheckpointSpec:
    c = CheckpointSpec(every_steps=o.int("everySteps", 100, lo=1, hi=10**9) or 100,
                       keep=o.int("keep", 3, lo=1, hi=1000) or 3,
                       on_preemption=o.bool("onPreemption", True))
    o.done()
    return c


def _loss_params(loss: str, v: Any, path: str) -> dict[str, Any]:
    if v is None:
        v = {}
    if not isinstance(v, dict):
        raise SpecError(path, f"must be an object, got {_kind(v)}")
    allowed = {
        "MatryoshkaLoss": {"matryoshkaDims", "matryoshkaWeights", "innerLoss", "miniBatchSize", "gatherAcrossDevices"},
        "CachedMultipleNegativesRankingLoss": {"miniBatchSize", "scale", "gatherAcrossDevices"},
        "MultipleNegativesRankingLoss": {"scale", "gatherAcrossDevices"},
        "CoSENTLoss": {"scale"},
        "DenoisingAutoEncoderLoss": {"tieEncoderDecoder", "noiseDeleteRatio"},
    }[loss]
    for k in v:
        if k not in allowed:
            raise SpecError(f"{path}.{k}", f"not a parameter of {loss} (allowed: {', '.join(sorted(allowed))})")
    if loss == "MatryoshkaLoss":
        dims = v.get("matryoshkaDims")
        if not isinstance(dims, list) or not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise SpecError(f"{path}.matryoshkaDims", "MatryoshkaLoss needs a non-empty list of positive integers")
        if len(set(dims)) != len(dims):
            raise SpecError(f"{path}.matryoshkaDims", "dimensions must be distinct")
        w = v.get("matryoshkaWeights")
        if w is not None and (not isinstance(w, list) or len(w) != len(dims)
                              or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in w)):
            raise SpecError(f"{path}.matryoshkaWeights", "must be a list of positive numbers, one per dimension")
        inner = v.get("innerLoss", "MultipleNegativesRankingLoss")
        if inner not in INNER_LOSSES:
            raise SpecError(f"{path}.innerLoss", f"unknown inner loss {_show(inner)}; expected one of: {', '.join(INNER_LOSSES)}{did_you_mean(inner, INNER_LOSSES, hint=True)}")
    tie = v.get("tieEncoderDecoder")
    if tie is not None and not isinstance(tie, bool):
        raise SpecError(f"{path}.tieEncoderDecoder", f"must be true or false, got {_kind(tie)}")
    ratio = v.get("noiseDeleteRatio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1):
        raise SpecError(f"{path}.noiseDeleteRatio", "must be a number in [0, 1)")
    mbs = v.get("miniBatchSize")
    if mbs is not None and (not isinstance(mbs, int) or isinstance(mbs, bool) or mbs < 1):
        raise SpecError(f"{path}.miniBatchSize", "must be a positive integer")
    gather = v.get("gatherAcrossDevices")
    if gather is not None and not isinstance(gather, bool):
        raise SpecError(f"{path}.gatherAcrossDevices", f"must be true or false, got {_kind(gather)}")
    scale = v.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise SpecError(f"{path}.scale", "must be a positive number")
    return dict(v)


def parse_training(o: _Obj) -> TrainingSpec:
    loss = o.str("loss", "MultipleNegativesRankingLoss", choices=LOSSES) or "MultipleNegativesRankingLoss"
    t = TrainingSpec(
        loss=loss,
        loss_params=_loss_params(loss, o.get("lossParams"), o.at("lossParams")),
        epochs=o.int("epochs", 1, lo=1, hi=10_000) or 1,
        max_steps=o.int("maxSteps", None, lo=1, hi=10**9),
        batch_size=o.int("batchSize", 32, lo=1, hi=65_536) or 32,
        learning_rate=o.float("learningRate", 2.0e-5, lo=0.0, hi=1.0, lo_open=True) or 2.0e-5,
        warmup_ratio=o.float("warmupRatio", 0.1, lo=0.0, hi=1.0) or 0.0,
        seed=o.int("seed", 42, lo=0, hi=2**32 - 1) or 0,
        precision=o.str("precision", "fp32", choices=PRECISIONS) or "fp32",
        max_seq_length=o.int("maxSeqLength", None, lo=1, hi=131_072),
        checkpoint=_checkpoint(o.sub("checkpoint")),
    )
    o.done()
    return t


def parse_lora(v: Any, path: str) -> LoraSpec | None:
    if v is None:
        return None
    o = _Obj(v, path)
    tm = o.get("targetModules")
    if tm is not None and (not isinstance(tm, list) or not tm
                           or not all(isinstance(x, str) and _NO_SPACE.match(x) and len(x) <= 253 for x in tm)):
        raise SpecError(o.at("targetModules"), "must be a non-empty list of module names")
    lo = LoraSpec(r=o.int("r", 8, lo=1, hi=4096) or 8,
                  alpha=o.int("alpha", 16, lo=1, hi=1_000_000) or 16,
                  dropout=o.float("dropout", 0.1, lo=0.0, hi=0.99) or 0.0,
                  target_modules=tuple(tm) if tm else None,
                  use_rslora=o.bool("useRslora", False))
    o.done()
    return lo
