"""Tier 4: what the one-node cluster changes on this machine, and how each change is undone.

Pure host plumbing for nodecluster.py, with no Kubernetes in it: the address pods reach the host
on, the images containerd imports (a docker-save archive made here for the pause binary; the
tags inside `docker save` archives), and the teardown of what a kubelet, containerd and the CNI
plugins leave behind when they are stopped (mounts, network namespaces, the bridge, iptables
rules, cgroups, runtime shims). Every cleanup is scoped to this harness's own root directory,
bridge, socket or rule comment, so another engineer's dockerd or cluster on the machine is left
alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETNS_DIR = Path("/var/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def run(*argv: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": HOST_PATH + ":" + os.environ.get("PATH", "")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check, env=env)


def host_address() -> str:
    """An IPv4 address of this machine that pods on the CNI bridge reach through their gateway:
    the source address of the default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.connect(("192.0.2.250", 9))  # TEST-NET-1: only the route lookup matters
        addr = str(s.getsockname()[0])
        if not addr.startswith("127."):
            return addr
    out = run("ip", "-o", "-4", "addr", "show", "scope", "global").stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) > 3 and not fields[1].startswith(("docker", "br-", "veth", "ftnode")):
            return fields[3].split("/")[0]
    raise RuntimeError("no global IPv4 address on this machine for pods to reach the API server on")


CAP_SYS_RESOURCE = 24


def has_capability(bit: int) -> bool:
    """Whether this process holds capability `bit` (effective set): root in a VM or a container
    may not (a firecracker VM here withholds CAP_SYS_RESOURCE)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


# -- images ----------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pause_image_archive(binary: Path, tag: str, dest: Path) -> Path:
    """A docker-save archive (what `ctr images import` reads) of one layer holding `binary` as /pause,
    run as 65535 like the upstream pause image."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = binary.read_bytes()
        info = tarfile.TarInfo("pause")
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    layer_bytes = layer.getvalue()
    layer_id = _sha256(layer_bytes)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_id}"]},
        "history": [{"created_by": "gcc -static pause.c (tests/node)"}],
    }).encode()  # fmt: skip
    config_name = f"{_sha256(config)}.json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [tag], "Layers": [f"{layer_id}/layer.tar"]}]
    ).encode()
    with tarfile.open(dest, "w") as tar:
        for name, payload in ((f"{layer_id}/layer.tar", layer_bytes), (config_name, config),
                              ("manifest.json", manifest)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(payload), 0o644
            tar.addfile(info, io.BytesIO(payload))
    return dest


def archive_tags(archive: Path) -> list[str]:
    """The RepoTags of a `docker save` archive (read from its manifest.json; layers are skipped over)."""
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.name == "manifest.json":
                    f = tar.extractfile(member)
                    return [t for entry in json.load(f) for t in entry.get("RepoTags") or []] if f else []
    except (tarfile.TarError, ValueError, OSError):
        return []
    return []


def normalize_image(ref: str) -> str:
    """The name containerd stores a Docker reference under: finetune-worker:dev ->
    docker.io/library/finetune-worker:dev."""
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    return f"{name}:{tag}"


# -- teardown --------------------------------------------------------------------------------------


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first."""
    prefix = str(root.resolve())
    points = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def unmount_all(root: Path) -> list[str]:
    """Unmount everything below `root` (lazily where busy); returns what would not go."""
    for _ in range(3):
        points = mounts_under(root)
        if not points:
            return []
        for point in points:
            if run("umount", point).returncode != 0:
                run("umount", "-l", point)
    return mounts_under(root)


def netns_names() -> set[str]:
    try:
        return {p.name for p in NETNS_DIR.iterdir()}
    except OSError:
        return set()


def delete_netns(names: set[str]) -> None:
    for name in sorted(names):
        run("ip", "netns", "delete", name)


def delete_link(name: str) -> None:
    if Path(f"/sys/class/net/{name}").exists():
        run("ip", "link", "delete", name)


def iptables_rules_with(comment: str, table: str = "filter") -> list[list[str]]:
    """The `-A CHAIN ...` rules of `table` whose text holds `comment`, as argument lists."""
    import shlex

    out = run("iptables", "-w", "-t", table, "-S").stdout
    return [shlex.split(line) for line in out.splitlines() if line.startswith("-A ") and comment in line]


def delete_iptables_rules(comment: str, table: str = "filter") -> None:
    for rule in iptables_rules_with(comment, table):
        run("iptables", "-w", "-t", table, "-D", *rule[1:])


def processes_with(needle: str) -> list[int]:
    """Pids of processes whose command line holds `needle` (e.g. a runtime shim's -address SOCKET)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(entry.name))
    return pids


def kill_pids(pids: list[int], grace: float = 5) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def remove_cgroups(name: str) -> None:
    """rmdir the `name` hierarchy (the kubelet's kubepods) in every cgroup v1 controller, leaves first."""
    with contextlib.suppress(OSError):
        for controller in CGROUP_ROOT.iterdir():
            top = controller / name
            if not top.is_dir():
                continue
            for d in sorted(
                (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


IPTABLES = ("iptables", "ip6tables")
TABLES = ("filter", "nat", "mangle")


def chains(prefix: str) -> set[tuple[str, str, str]]:
    """(binary, table, chain) of every iptables/ip6tables chain whose name starts with `prefix`."""
    found = set()
    for binary in IPTABLES:
        for table in TABLES:
            for line in run(binary, "-w", "-t", table, "-S").stdout.splitlines():
                if line.startswith(f"-N {prefix}"):
                    found.add((binary, table, line.split()[1]))
    return found


def delete_chains(names: set[tuple[str, str, str]]) -> None:
    """Remove every rule that jumps to one of these chains, then the chains themselves."""
    import shlex

    for binary, table in {(b, t) for b, t, _ in names}:
        ours = {c for b, t, c in names if (b, t) == (binary, table)}
        for line in run(binary, "-w", "-t", table, "-S").stdout.splitlines():
            rule = shlex.split(line)
            if rule[:1] == ["-A"] and "-j" in rule and rule[rule.index("-j") + 1] in ours:
                run(binary, "-w", "-t", table, "-D", *rule[1:])
        for chain in ours:
            run(binary, "-w", "-t", table, "-F", chain)
        for chain in ours:
            run(binary, "-w", "-t", table, "-X", chain)


def remove_empty_dirs(*dirs: Path) -> None:
    """rmdir each of `dirs` that is empty (in order: children first)."""
    for d in dirs:
        with contextlib.suppress(OSError):
            d.rmdir()
