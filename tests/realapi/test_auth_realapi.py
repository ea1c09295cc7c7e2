"""The operator's credentials against a real kube-apiserver: a kubeconfig exec plugin that answers
with short-lived client certificates (as Teleport's `tsh kube credentials` does).

kubernetes_asyncio writes such a certificate to files once and never runs the plugin again, and
the server refuses an expired certificate on every new request: the operator lost the API server
when its first certificate expired. cluster/auth.py runs the plugin again before the expiry (and after
a 401), and kopf logs in again at the expiry its login handler reports.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml
from controlplane import OPERATOR_USER
from operator_proc import OperatorProcess, audit_events, audit_offset
from realenv import Env

pytestmark = pytest.mark.slow
pytest.importorskip("cryptography", reason="the test's exec plugin mints certificates with cryptography")

LIFETIME = 40  # seconds: the operator must replace each certificate (its skew is 30 s) before this

PLUGIN = """
import datetime as dt, json, pathlib, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
pki, counter, user, lifetime = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
key = ec.generate_private_key(ec.SECP256R1())
now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(seconds=lifetime))
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256()))
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": {
    "clientCertificateData": cert.public_bytes(serialization.Encoding.PEM).decode(),
    "clientKeyData": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()).decode(),
    "expirationTimestamp": (now + dt.timedelta(seconds=lifetime)).strftime("%Y-%m-%dT%H:%M:%SZ")}}))
"""


def job_spec(steps: int) -> dict[str, object]:
    return {"model": {"base": "builtin:all-MiniLM-L6-v2"}, "dataset": {"inline": [{"question": "q", "answer": "a"}]},
            "training": {"maxSteps": steps}, "resources": {"gpus": 0, "cpu": "1", "memory": "1Gi"}}


def test_operator_keeps_working_past_its_exec_plugin_certificates_expiry(env: Env, tmp_path: Path) -> None:
    plugin, counter = tmp_path / "plugin.py", tmp_path / "count"
    plugin.write_text(PLUGIN)
    cp = env.cp
    config = yaml.safe_load(cp.kubeconfig_path("operator").read_text())
    config["users"][0]["user"] = {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable, "interactiveMode": "Never",
        "args": [str(plugin), str(cp.root / "pki"), str(counter), OPERATOR_USER, str(LIFETIME)]}}  # fmt: skip
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    # watches end after 15 s: kopf's next requests come after the first certificates' expiry
    proc = OperatorProcess(cp, [env.ns], {"FINETUNE_RESYNC_SECONDS": "1", "FINETUNE_WATCH_TIMEOUT_SECONDS": "15"},
                           kubeconfig=tmp_path / "kubeconfig", log=tmp_path / "operator.log")  # fmt: skip
    started, offset = time.time(), audit_offset(cp.audit_log)
    try:
        proc.start()
        env.configure("early-workspace", steps=10**6, stepSeconds=0.5)  # trains throughout: a status write a second
        env.create_job("early", job_spec(10**6))
        env.wait_phase("early", "Training", 60)
        time.sleep(max(0.0, started + LIFETIME + 20 - time.time()))  # the first certificates have expired
        env.configure("late-workspace", steps=3, stepSeconds=0.1)
        env.create_job("late", job_spec(3))  # seen on a watch kopf opened after its first login expired
        env.wait_phase("late", "Succeeded", 90)
        step = env.status("early")["progress"]["step"]
        env.wait_for(lambda: env.status("early")["progress"]["step"] > step, 30, "early's progress to move on")
        assert proc.alive, proc.tail()
    finally:
        proc.kill()
    runs = int(counter.read_text())
    # each load runs it twice (the library's run, then ours for the expiry): the client's and kopf's
    # login at start, then at least one replacement in the client and one more login of kopf's
    assert runs >= 7, (runs, proc.tail())
    refused = [ev for _, ev in audit_events(cp.audit_log, offset) if ev.get("responseStatus", {}).get("code") == 401]
    assert not refused, f"{len(refused)} requests refused: {[(ev.get('userAgent'), ev.get('requestURI')) for ev in refused[:5]]}"
