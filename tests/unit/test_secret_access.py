"""The operator's `get secrets` grant (manifests/rbac/operator_role.yaml) and what happens without it.

The grant exists for one check: before a launch, that every Secret and key a job's
spec.credentials names exists, so a missing one is reported as `SecretMissing` with its name
instead of a pod stuck in CreateContainerConfigError. README's RBAC paragraph says so (issue 22:
it said "no secrets"). A site that removes the grant loses only that early check: the pod then
waits, and status names the kubelet's reason (observe.held_by).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from finetune_api.spec import parse_spec
from finetune_operator.cluster import passes
from finetune_operator.cluster.kube import ApiError


class ForbiddenKube:
    async def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        raise ApiError(403, "Forbidden", f'secrets "{name}" is forbidden: User "system:serviceaccount:x:y" cannot get')


def _spec() -> Any:
    return parse_spec({"dataset": {"inline": [{"anchor": "q", "positive": "a"}]},
                       "credentials": {"huggingface": {"secretName": "hf-token"}}})  # fmt: skip


async def test_without_the_grant_the_secret_check_is_skipped_not_a_failed_pass() -> None:
    assert await passes._secret_keys(ForbiddenKube(), "ml", _spec()) is None  # type: ignore[arg-type]


def test_the_grant_is_get_only_and_the_readme_says_why() -> None:
    docs = list(yaml.safe_load_all(Path("manifests/rbac/operator_role.yaml").read_text()))
    rules = [r for d in docs if d and d["kind"] == "ClusterRole" for r in d["rules"] if "secrets" in r["resources"]]
    assert [r["verbs"] for r in rules] == [["get"]]  # never list or watch: no bulk read of a cluster's Secrets
    readme = Path("README.md").read_text()
    rbac = next(p for p in readme.split("\n- ") if p.startswith("**RBAC**"))
    assert "no secrets" not in rbac.lower()
    assert re.search(r"`get` on Secrets", rbac) and "SecretMissing" in rbac
