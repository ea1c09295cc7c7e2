"""Losses from the spec, checks that need the model, and weights that live in the loss.

DenoisingAutoEncoderLoss (TSDAE) owns a decoder the Trainer never saves; `save_loss_state` /
`load_loss_state` put it in every checkpoint so a resumed run continues with the same decoder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api.distributed import GATHER_LOSSES, gather_across_devices
from finetune_api.spec import FineTuneSpec

from .errors import InvalidInput
from .safeio import without_mmap_on_enodev

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

LOSS_STATE_FILE = "loss_state.pt"  # in checkpoint-N/, next to the Trainer's files


def check_loss_against_model(spec: FineTuneSpec, model: SentenceTransformer) -> None:
    """Checks that need the model: Matryoshka dimensions within the embedding size, TSDAE on a transformer.

    Raises:
        InvalidInput: naming the field and the model's actual size.
    """
    params = spec.training.loss_params
    dim = (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()
    if spec.training.loss == "MatryoshkaLoss" and dim is not None:
        too_big = [d for d in params["matryoshkaDims"] if d > dim]
        if too_big:
            raise InvalidInput(f"spec.training.lossParams.matryoshkaDims: {too_big} exceed the model's embedding size {dim}")
    if spec.training.loss == "DenoisingAutoEncoderLoss" and params.get("tieEncoderDecoder", True) is not True:
        raise InvalidInput("spec.training.lossParams.tieEncoderDecoder: only a decoder tied to the encoder is supported")


def _simple(name: str, model: SentenceTransformer, params: dict[str, Any], world_size: int = 1) -> torch.nn.Module:
    from sentence_transformers.sentence_transformer import losses

    kwargs: dict[str, Any] = {}
    if name in GATHER_LOSSES:
        kwargs["gather_across_devices"] = gather_across_devices(params, world_size)
    if "scale" in params:
        kwargs["scale"] = float(params["scale"])
    if name == "CachedMultipleNegativesRankingLoss":
        kwargs["mini_batch_size"] = int(params.get("miniBatchSize", 32))
        kwargs["show_progress_bar"] = False
    loss: torch.nn.Module = getattr(losses, name)(model, **kwargs)
    return loss


def build_loss(spec: FineTuneSpec, model: SentenceTransformer, world_size: int = 1) -> torch.nn.Module:
    """The loss module the spec names, bound to the model; in-batch negatives gathered from every rank
    when world_size > 1 (lossParams.gatherAcrossDevices, default on)."""
    from sentence_transformers.sentence_transformer import losses

    name, params = spec.training.loss, spec.training.loss_params
    if name == "MatryoshkaLoss":
        inner_params = {k: v for k, v in params.items() if k in ("miniBatchSize", "gatherAcrossDevices")}
        inner = _simple(spec.training.inner_loss, model, inner_params, world_size)
        weights = params.get("matryoshkaWeights")
        return losses.MatryoshkaLoss(model, inner, matryoshka_dims=list(params["matryoshkaDims"]),
                                     matryoshka_weights=list(weights) if weights else None)
    if name == "DenoisingAutoEncoderLoss":
        def without_mmap() -> torch.nn.Module:
            with _decoder_without_mmap():
                return losses.DenoisingAutoEncoderLoss(model, tie_encoder_decoder=True)

        try:  # errno 19: the decoder's weights cannot be memory-mapped here
            return without_mmap_on_enodev(
                lambda: losses.DenoisingAutoEncoderLoss(model, tie_encoder_decoder=True), without_mmap,
                getattr(getattr(model, "transformers_model", None), "name_or_path", "the decoder"),
            )  # fmt: skip
        except (ValueError, OSError, AssertionError) as e:
            raise InvalidInput(f"spec.training.loss: DenoisingAutoEncoderLoss cannot build a decoder for this model: {e}") from None
    return _simple(name, model, params, world_size)


@contextlib.contextmanager
def _decoder_without_mmap() -> Iterator[None]:
    """DenoisingAutoEncoderLoss loads its decoder with AutoModelForCausalLM.from_pretrained and takes
    no loading options (sentence-transformers 6.2.0, pinned); for the one call, pass disable_mmap."""
    import functools

    from sentence_transformers.sentence_transformer.losses import denoising_auto_encoder as dae

    auto = dae.AutoModelForCausalLM

    class _NoMmap:
        from_pretrained = functools.partial(auto.from_pretrained, disable_mmap=True)

    dae.AutoModelForCausalLM = _NoMmap  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        dae.AutoModelForCausalLM = auto  # type: ignore[misc]


def _held_modules(loss: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules with weights the model does not hold (today: the TSDAE decoder)."""
    decoder = getattr(loss, "decoder", None)
    return {"decoder": decoder} if decoder is not None else {}


def has_loss_state(loss: torch.nn.Module) -> bool:
    return bool(_held_modules(loss))


def save_loss_state(loss: torch.nn.Module, checkpoint_dir: Path) -> None:
    """Write the loss-held weights into a checkpoint directory (no-op for losses without any)."""
    import torch

    held = _held_modules(loss)
    if held:
        state = {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for name, m in held.items()}
        torch.save(state, Path(checkpoint_dir) / LOSS_STATE_FILE)


def load_loss_state(loss: torch.nn.Module, checkpoint_dir: Path) -> bool:
    """Restore the loss-held weights from a checkpoint; False when the loss holds none."""
    import torch

    held = _held_modules(loss)
    if not held:
        return False
    state = torch.load(Path(checkpoint_dir) / LOSS_STATE_FILE, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, m in held.items():
            m.load_state_dict(state[name])
    return True
