"""Remote locations (s3://, oci://) and the credentials that reach them, by reference only.

Pure (no I/O, no kopf, no torch). Both planes import it: the spec parser validates
`spec.credentials`, `export.push` and `s3://` data/model URLs with it; the builders map each
credential to the conventional environment of its ecosystem (so the worker runs the same outside
Kubernetes with the same variables); reconcile checks that the referenced Secrets and keys exist
before a launch.

    spec.credentials:
      huggingface: {secretName: hf, key: token}          -> HF_TOKEN
      s3: {secretName: s3, endpoint: URL, region: R}     -> AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
                                                            AWS_SESSION_TOKEN (optional key),
                                                            AWS_ENDPOINT_URL, AWS_REGION (plain values)
      registry: {secretName: regcred}                    -> DOCKER_CONFIG (the dockerconfigjson mounted)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from finetune_api.fields import _DNS_SUBDOMAIN, SpecError, _Obj, _show

HF_TOKEN_ENV = "HF_TOKEN"
AWS_ACCESS_KEY_ENV = "AWS_ACCESS_KEY_ID"
AWS_SECRET_KEY_ENV = "AWS_SECRET_ACCESS_KEY"
AWS_SESSION_TOKEN_ENV = "AWS_SESSION_TOKEN"
AWS_ENDPOINT_ENV = "AWS_ENDPOINT_URL"
AWS_REGION_ENV = "AWS_REGION"
AWS_DEFAULT_REGION_ENV = "AWS_DEFAULT_REGION"  # what botocore reads; AWS_REGION is what other SDKs read
DOCKER_CONFIG_ENV = "DOCKER_CONFIG"
DOCKERCONFIGJSON_KEY = ".dockerconfigjson"  # the key of a kubernetes.io/dockerconfigjson Secret
# Every variable a credential may set: the worker never writes their values anywhere.
SECRET_ENV_NAMES = (HF_TOKEN_ENV, AWS_ACCESS_KEY_ENV, AWS_SECRET_KEY_ENV, AWS_SESSION_TOKEN_ENV)

S3_SCHEME = "s3://"
OCI_SCHEME = "oci://"
MAX_PUSH_TARGETS = 8
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
_S3_URL = re.compile(rf"s3://({_BUCKET})(/[^\x00-\x1f\x7f]*)?")  # fullmatch: `$` would allow a final newline
_OCI_REF = re.compile(
    r"oci://(?P<registry>[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?)"
    r"/(?P<repository>[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*)"
    r":(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127})"
)
_URL = re.compile(r"https?://[^ /\x00-\x1f\x7f]+(/[^ \x00-\x1f\x7f]*)?")


@dataclass(frozen=True)
class SecretKey:
    """One Secret key a job needs: where it is named in the spec, and whether a pod needs it."""

    secret: str
    key: str
    field: str  # e.g. spec.credentials.s3.secretName
    optional: bool = False


@dataclass(frozen=True)
class HubCredentials:
    secret_name: str
    key: str = "token"


@dataclass(frozen=True)
class S3Credentials:
    secret_name: str | None = None
    endpoint: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class RegistryCredentials:
    secret_name: str


@dataclass(frozen=True)
class CredentialsSpec:
    huggingface: HubCredentials | None = None
    s3: S3Credentials | None = None
    registry: RegistryCredentials | None = None

    def secret_keys(self) -> list[SecretKey]:
        """Every Secret key a worker pod reads, in a stable order."""
        out = []
        if self.huggingface is not None:
            out.append(SecretKey(self.huggingface.secret_name, self.huggingface.key,
                                 "spec.credentials.huggingface.secretName"))  # fmt: skip
        if self.s3 is not None and self.s3.secret_name:
            field = "spec.credentials.s3.secretName"
            out += [SecretKey(self.s3.secret_name, AWS_ACCESS_KEY_ENV, field),
                    SecretKey(self.s3.secret_name, AWS_SECRET_KEY_ENV, field),
                    SecretKey(self.s3.secret_name, AWS_SESSION_TOKEN_ENV, field, optional=True)]  # fmt: skip
        if self.registry is not None:
            out.append(SecretKey(self.registry.secret_name, DOCKERCONFIGJSON_KEY,
                                 "spec.credentials.registry.secretName"))  # fmt: skip
        return out


def _secret_name(o: _Obj, required: bool = True) -> str | None:
    name = o.str("secretName", None, max_len=253)
    if name is None and required:
        raise SpecError(o.at("secretName"), "required: the name of a Secret in the job's namespace")
    if name is not None and not _DNS_SUBDOMAIN.fullmatch(name):
        raise SpecError(o.at("secretName"), f"not a Secret name: {_show(name)}")
    return name


def parse_credentials(o: _Obj) -> CredentialsSpec:
    """`spec.credentials`: Secret references only (a value here would end up in etcd and the pod spec)."""
    hub = reg = s3 = None
    if o.get("huggingface") is not None:
        h = o.sub("huggingface")
        name = _secret_name(h)
        key = h.str("key", "token", max_len=253) or "token"
        if not _SECRET_KEY.fullmatch(key):
            raise SpecError(h.at("key"), f"not a Secret key: {_show(key)}")
        h.done()
        hub = HubCredentials(secret_name=str(name), key=key)
    if o.get("s3") is not None:
        s = o.sub("s3")
        endpoint = s.str("endpoint", None, max_len=1024)
        if endpoint is not None and not _URL.fullmatch(endpoint):
            raise SpecError(s.at("endpoint"), f"not an http(s) URL: {_show(endpoint)} (e.g. https://minio.example:9000)")
        region = s.str("region", None, max_len=63)
        if region is not None and not re.fullmatch(r"[a-z0-9-]+", region):
            raise SpecError(s.at("region"), f"not a region name: {_show(region)} (e.g. us-east-1)")
        s3 = S3Credentials(secret_name=_secret_name(s, required=False), endpoint=endpoint, region=region)
        s.done()
    if o.get("registry") is not None:
        r = o.sub("registry")
        reg = RegistryCredentials(secret_name=str(_secret_name(r)))
        r.done()
    o.done()
    return CredentialsSpec(huggingface=hub, s3=s3, registry=reg)


def is_s3(path: str | None) -> bool:
    return bool(path) and str(path).startswith(S3_SCHEME)


def split_s3(url: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> (`bucket`, `some/key`)."""
    bucket, _, key = url[len(S3_SCHEME):].partition("/")
    return bucket, key


def check_s3_url(url: str, where: str, *, prefix: bool) -> str:
    """An `s3://bucket/key` URL (a prefix when `prefix`; an object otherwise, which needs a key)."""
    m = _S3_URL.fullmatch(url)
    if not m:
        raise SpecError(where, f"not an s3:// URL: {_show(url)} (e.g. s3://my-bucket/data/train.jsonl)")
    key = (m.group(2) or "/")[1:]
    if ".." in key.split("/"):
        raise SpecError(where, f"must not contain a '..' segment: {_show(url)}")
    if not prefix and (not key or key.endswith("/")):
        raise SpecError(where, f"names a prefix, not an object: {_show(url)} (e.g. s3://my-bucket/data/train.jsonl)")
    return url


@dataclass(frozen=True)
class OciRef:
    registry: str  # host[:port]
    repository: str
    tag: str

    @property
    def target(self) -> str:  # what ORAS takes
        return f"{self.registry}/{self.repository}:{self.tag}"


def parse_oci_ref(url: str, where: str = "spec.export.push") -> OciRef:
    m = _OCI_REF.fullmatch(url)
    if not m:
        raise SpecError(where, f"not an OCI reference: {_show(url)} (e.g. oci://registry.example.com/team/model:v1)")
    return OciRef(registry=m.group("registry"), repository=m.group("repository"), tag=m.group("tag"))


def parse_push(v: Any, where: str) -> tuple[str, ...]:
    """`spec.export.push`: s3://bucket/prefix/ and oci://registry/repository:tag targets."""
    if v is None:
        return ()
    if not isinstance(v, list):
        raise SpecError(where, "must be a list of s3://bucket/prefix/ or oci://registry/repository:tag targets")
    if len(v) > MAX_PUSH_TARGETS:
        raise SpecError(where, f"at most {MAX_PUSH_TARGETS} targets")
    for i, t in enumerate(v):
        at = f"{where}[{i}]"
        if not isinstance(t, str) or not (t.startswith(S3_SCHEME) or t.startswith(OCI_SCHEME)):
            raise SpecError(at, f"must start with s3:// or oci://, got {_show(t)}")
        if t.startswith(S3_SCHEME):
            check_s3_url(t, at, prefix=True)
        else:
            parse_oci_ref(t, at)
    if len(set(v)) != len(v):
        raise SpecError(where, "targets must be distinct")
    return tuple(v)


def missing_secrets(creds: CredentialsSpec, secrets: dict[str, frozenset[str]]) -> str | None:
    """What is missing, as a user-facing sentence, given the Secrets found (name -> their keys)."""
    for need in creds.secret_keys():
        keys = secrets.get(need.secret)
        if keys is None:
            return f"Secret {need.secret} ({need.field}) does not exist in the job's namespace"
        if need.key not in keys and not need.optional:
            return f"Secret {need.secret} ({need.field}) has no key {need.key}"
    return None


REGISTRY_VOLUME = "registry-credentials"
REGISTRY_MOUNT = "/var/run/secrets/finetune.dev/registry"  # DOCKER_CONFIG: <mount>/config.json


def _from_secret(env: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": env, "valueFrom": {"secretKeyRef": ref}}


def credential_env(creds: CredentialsSpec, *, registry: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                                        list[dict[str, Any]]]:
    """(env, volumes, volumeMounts) that hand a worker container its credentials: secret values only
    through secretKeyRef and a Secret volume (never a value in the pod spec); endpoint and region,
    which are not secret, as plain values. `registry`: whether this pod pushes to OCI registries."""
    env: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if creds.huggingface is not None:
        env.append(_from_secret(HF_TOKEN_ENV, creds.huggingface.secret_name, creds.huggingface.key))
    if creds.s3 is not None:
        if creds.s3.secret_name:
            name = creds.s3.secret_name
            env += [_from_secret(AWS_ACCESS_KEY_ENV, name, AWS_ACCESS_KEY_ENV),
                    _from_secret(AWS_SECRET_KEY_ENV, name, AWS_SECRET_KEY_ENV),
                    _from_secret(AWS_SESSION_TOKEN_ENV, name, AWS_SESSION_TOKEN_ENV, optional=True)]  # fmt: skip
        if creds.s3.endpoint:
            env.append({"name": AWS_ENDPOINT_ENV, "value": creds.s3.endpoint})
        if creds.s3.region:
            env += [{"name": AWS_REGION_ENV, "value": creds.s3.region},
                    {"name": AWS_DEFAULT_REGION_ENV, "value": creds.s3.region}]  # fmt: skip
    if registry and creds.registry is not None:
        volumes.append({"name": REGISTRY_VOLUME, "secret": {
            "secretName": creds.registry.secret_name, "defaultMode": 0o440,
            "items": [{"key": DOCKERCONFIGJSON_KEY, "path": "config.json"}]}})  # fmt: skip
        mounts.append({"name": REGISTRY_VOLUME, "mountPath": REGISTRY_MOUNT, "readOnly": True})
        env.append({"name": DOCKER_CONFIG_ENV, "value": REGISTRY_MOUNT})
    return env, volumes, mounts
