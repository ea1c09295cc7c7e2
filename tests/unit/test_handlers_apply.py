"""Applying a plan when the API refuses a create: the job says why, the handler retries later."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import kopf
import pytest

from finetune_operator.cluster import handlers
from finetune_operator.cluster.kube import ApiError
from finetune_operator.decisions.observe import Observed
from finetune_operator.decisions.reconcile import reconcile


class RefusingKube:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []

    async def create(self, obj: dict[str, Any]) -> bool:
        if obj["kind"] == "Pod":
            raise ApiError(403, "Forbidden", 'pods "j-train-1" is forbidden: exceeded quota: gpu')
        return True

    async def patch(
        self, api_version: str, plural: str, ns: str, name: str, body: dict[str, Any], **_: Any
    ) -> dict:
        self.patches.append(body)
        return {}


async def test_a_refused_create_is_reported_on_the_job_and_retried() -> None:
    job = {"metadata": {"name": "j", "namespace": "ml", "uid": "u", "generation": 1},
           "spec": {"dataset": {"inline": [{"question": "q", "answer": "a"}]}}, "status": {}}  # fmt: skip
    plan = reconcile(job, Observed(), dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    kube = RefusingKube()
    with pytest.raises(kopf.TemporaryError, match="exceeded quota"):
        await handlers.apply(kube, job, plan, logger=logging.getLogger("test"))  # type: ignore[arg-type]
    assert kube.patches == [
        {"status": {"reason": "CreateFailed", "message": kube.patches[0]["status"]["message"]}}
    ]
    assert "cannot create Pod j-train-1" in kube.patches[0]["status"]["message"]
