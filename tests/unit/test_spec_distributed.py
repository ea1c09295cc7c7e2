"""spec.distributed and storage.accessModes: defaults, the world size, and the refusals that name a field."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_api.distributed import gather_across_devices
from finetune_api.spec import SpecError, parse_spec

PAIRS = [{"anchor": "a", "positive": "b"}]


def _spec(**extra: Any) -> dict[str, Any]:
    return {"dataset": {"inline": PAIRS}, **extra}


def test_defaults_are_one_process_and_a_read_write_once_claim() -> None:
    s = parse_spec(_spec(resources={"gpus": 0}))
    assert (s.distributed.nodes, s.distributed.procs_per_node, s.distributed.backend) == (1, None, "auto")
    assert s.world_size == 1 and s.storage.access_modes == ("ReadWriteOnce",)
    assert s.distributed.resolved_backend(0) == "gloo"


@pytest.mark.parametrize(("distributed", "gpus", "world", "backend"), [
    ({"procsPerNode": "auto"}, 4, 4, "nccl"),   # one process per GPU
    ({"procsPerNode": "auto"}, 0, 1, "gloo"),   # 1 on CPU
    ({"procsPerNode": 3}, 0, 3, "gloo"),
    ({"nodes": 2, "procsPerNode": 2}, 2, 4, "nccl"),
    ({"nodes": 3, "backend": "gloo"}, 1, 3, "gloo"),
])  # fmt: skip
def test_world_size_and_backend(distributed: dict[str, Any], gpus: int, world: int, backend: str) -> None:
    s = parse_spec(_spec(distributed=distributed, resources={"gpus": gpus}))
    assert s.world_size == world and s.distributed.resolved_backend(gpus) == backend


def test_several_nodes_default_to_a_read_write_many_claim() -> None:
    s = parse_spec(_spec(distributed={"nodes": 2}))
    assert s.storage.access_modes == ("ReadWriteMany",)


@pytest.mark.parametrize(("extra", "field", "words"), [
    ({"distributed": {"nodes": 2}, "storage": {"accessModes": ["ReadWriteOnce"]}}, "spec.storage.accessModes",
     "must be ReadWriteMany"),
    ({"distributed": {"procsPerNode": 2}, "resources": {"gpus": 1}}, "spec.distributed.procsPerNode", "one process per GPU"),
    ({"distributed": {"procsPerNode": True}}, "spec.distributed.procsPerNode", "'auto' or an integer"),
    ({"distributed": {"procsPerNode": 65}}, "spec.distributed.procsPerNode", "between 1 and 64"),
    ({"distributed": {"backend": "nccl"}, "resources": {"gpus": 0}}, "spec.distributed.backend", "nccl needs GPUs"),
    ({"distributed": {"hosts": 2}}, "spec.distributed.hosts", "unknown field"),
    ({"training": {"loss": "CachedMultipleNegativesRankingLoss"}, "distributed": {"nodes": 2}}, "spec.training.loss",
     "cannot train on 2 processes"),
    ({"training": {"loss": "CoSENTLoss", "lossParams": {"gatherAcrossDevices": True}}},
     "spec.training.lossParams.gatherAcrossDevices", "not a parameter of CoSENTLoss"),
    ({"training": {"loss": "MatryoshkaLoss", "lossParams": {"matryoshkaDims": [8], "innerLoss": "CoSENTLoss",
                                                             "gatherAcrossDevices": True}}},
     "spec.training.lossParams.gatherAcrossDevices", "no in-batch negatives"),
    ({"training": {"lossParams": {"gatherAcrossDevices": "yes"}}}, "spec.training.lossParams.gatherAcrossDevices",
     "true or false"),
])  # fmt: skip
def test_combinations_that_cannot_work_are_refused_naming_the_field(extra: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec(_spec(**extra))
    assert e.value.field == field and words in e.value.message, str(e.value)


def test_tsdae_on_several_processes_is_refused_with_the_reason() -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({"dataset": {"inline": [{"text": "t"}]}, "training": {"loss": "DenoisingAutoEncoderLoss"},
                    "resources": {"gpus": 2}})
    assert e.value.field == "spec.training.loss" and "decoder lives in the loss" in e.value.message


def test_in_batch_negatives_are_gathered_by_default_only_when_distributed() -> None:
    assert gather_across_devices({}, 1) is False
    assert gather_across_devices({}, 4) is True
    assert gather_across_devices({"gatherAcrossDevices": False}, 4) is False
