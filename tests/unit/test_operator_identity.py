"""`finetune-operator run --peering` names its replica without a passwd entry (issue 22).

The operator image runs as uid 65532 with no passwd entry; kopf names a peer with
getpass.getuser() unless told otherwise, which raised `KeyError: 'getpwuid(): uid not found:
65532'` and put every replica of the shipped Deployment in CrashLoopBackOff. The probe runs the
real `run_operator` in a process of its own whose uid has no passwd entry (pwd.getpwuid raises as
it does there, no USER/LOGNAME), with kopf.run replaced by what kopf.run does first with an
identity: take the one given, else detect its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, pwd, kopf
from kopf._core.engines import peering
from finetune_operator import cli
def getpwuid(uid):
    raise KeyError(f"getpwuid(): uid not found: {uid}")
pwd.getpwuid = getpwuid
seen = {}
def run(**kwargs):  # kopf.run: the identity given, else kopf's own (reactor/running.py)
    seen["identity"] = kwargs.get("identity") or peering.detect_own_id(manual=False)
kopf.run = run
cli.run_operator([], liveness_port=0, metrics_port=0, verbose=False, peering="finetune-operator", priority=1)
print(json.dumps(seen))
"""


def _identity(env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("USER", "LOGNAME", "LNAME", "USERNAME", "POD_ID")}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={**clean, **env})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return str(json.loads(out.stdout.strip().splitlines()[-1])["identity"])


def test_a_replica_whose_uid_has_no_passwd_entry_is_named_by_its_uid() -> None:
    identity = _identity({})
    assert identity.startswith(f"uid-{os.getuid()}@"), identity


def test_in_a_pod_the_replica_is_named_after_the_pod() -> None:
    assert _identity({"POD_ID": "finetune-operator-7d9c-x2x4q"}) == "finetune-operator-7d9c-x2x4q"


@pytest.mark.parametrize("path", ["manifests/manager/deployment.yaml"])
def test_the_shipped_deployment_passes_the_pod_name_as_pod_id(path: str) -> None:
    import yaml

    with open(path) as f:
        deployment = yaml.safe_load(f)
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
