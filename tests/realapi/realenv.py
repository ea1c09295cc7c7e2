"""One tier-3b test's view of the shared server: its namespace, the admin client, the kubelet, helpers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from controlplane import ControlPlane, wait_for
from kubelet import RealApiKubelet

from finetune_api import contract


class Env:
    """One test's view: its namespace on the shared server, the admin client, the kubelet, helpers."""

    def __init__(self, cp: ControlPlane, kubelet: RealApiKubelet, ns: str) -> None:
        self.cp, self.kubelet, self.ns = cp, kubelet, ns
        self.api = cp.client()

    def kubectl(self, *args: str, **kw: Any) -> Any:
        return self.cp.kubectl("-n", self.ns, *args, **kw)

    def create_job(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        obj = {"apiVersion": contract.API_VERSION, "kind": contract.KIND, "metadata": {"name": name}, "spec": spec}
        return self.api.create(obj, self.ns, plural=contract.PLURAL)

    def job(self, name: str) -> dict[str, Any] | None:
        return self.api.get(contract.API_VERSION, contract.PLURAL, self.ns, name)

    def patch_job(self, name: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.api.patch(contract.API_VERSION, contract.PLURAL, self.ns, name, body, **kw)

    def status(self, name: str) -> dict[str, Any]:
        return (self.job(name) or {}).get("status") or {}

    def pod(self, name: str) -> dict[str, Any] | None:
        return self.api.get("v1", "pods", self.ns, name)

    def pods(self, selector: str = "") -> list[dict[str, Any]]:
        return self.api.list("v1", "pods", self.ns, **({"labelSelector": selector} if selector else {}))

    def claim(self, name: str) -> dict[str, Any] | None:
        return self.api.get("v1", "persistentvolumeclaims", self.ns, name)

    def events(self, involved: str) -> list[str]:
        items = self.api.list("v1", "events", self.ns, fieldSelector=f"involvedObject.name={involved}")
        items.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
        return [e["reason"] for e in items]

    def configure(self, claim: str, **cfg: Any) -> None:
        """The fake worker's behaviour for the job whose workspace is `claim` (fake_worker.py)."""
        ws = self.kubelet.workspace(self.ns, claim)
        ws.mkdir(parents=True, exist_ok=True)
        (ws / "fake-worker.json").write_text(json.dumps(cfg))

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            st = self.status(name)
            return st if st.get("phase") == phase else None

        try:
            return wait_for(reached, timeout, 0.2, what=f"{name} phase {phase}")
        except TimeoutError as e:
            st = self.status(name)
            raise TimeoutError(f"{e}; now {st.get('phase')}: {st.get('reason')} {st.get('message')}") from None

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
        return wait_for(predicate, timeout, 0.2, what=what)
