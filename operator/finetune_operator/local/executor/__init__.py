"""Run Pod manifests as local processes: the embedded local runner and the test kubelet share this.

One executor, two users (DESIGN.md): `finetune-operator local` drives the real `reconcile` with it,
and the tier-3 test kubelet starts the pods the operator creates in the emulated API with it.

What a pod becomes here:
  - `spec.containers[0]` `command + args` run as one local process in its own session (process
    group); without `command`, the image ENTRYPOINT is `default_command` (`finetune-worker`);
    `$(VAR)` references to the container's env are expanded as the kubelet does; `command[0]` is
    looked up in `bin_dir` (default: the directory of `sys.executable`, i.e. the venv's console
    scripts), then on PATH.
  - env: the host environment, overlaid with the container's `env` (`value`, and `valueFrom.fieldRef`
    for metadata.name/namespace/uid); `FINETUNE_TERMINATION_LOG` points at `pods/<name>/termination-log`.
    Secrets (`secretKeyRef` env, `secret` volumes) are read through `secrets` when given (the test
    kubelet reads the emulator's); without it (the local runner) they are skipped, along with env
    values pointing into a secret volume, so the user's own HF_TOKEN, AWS_* and DOCKER_CONFIG pass.
  - volumes: `persistentVolumeClaim` -> `root/pvcs/<claimName>/` (created, kept across pods, which is
    what makes resume-from-checkpoint work); `emptyDir` and any other kind -> a fresh directory under
    `pods/<name>/volumes/`. Every arg, env value and workingDir equal to or under a `mountPath`
    (also as the value of `--flag=PATH`) is rewritten to the local directory (`subPath` honoured).
    `readOnly` is not enforced: the processes run as this user.
  - a multi-node gang's rendezvous (PET_RDZV_ENDPOINT, the rank-0 pod's DNS name) -> 127.0.0.1 and
    one free port per rendezvous id, so the members of an attempt find each other on this machine.
  - stdout+stderr -> `pods/<name>/log`; status is a Kubernetes PodStatus dict.
  - `resources.limits.memory` is enforced like the kernel's cgroup OOM killer: a pod whose process
    tree's RSS goes over the limit is SIGKILLed and reported as `OOMKilled`, exit code 137.
  - delete = SIGTERM to the main process, wait up to the grace period, then SIGKILL the whole group,
    as a container runtime does.

The rooms, along what a runtime does with a pod:
  facade    LocalPodExecutor, the one object its users hold: each call handed to a room below
  start     a manifest becomes a process group: directories, env, argv, Popen
  watch     reapers and the OOM killer: noticing that pods end
  stop      signals, delete with a grace period, close
  report    the PodStatus, the termination message, the log
  state     a pod's record, the table of pods by name, the directories under `root`
  podspec   a pod spec's local meaning: mounts as paths, env, quantities, rendezvous ports

Pure Python and POSIX only: no kopf, no torch, no API client.
"""

from finetune_operator.local.executor.facade import LocalPodExecutor as LocalPodExecutor
from finetune_operator.local.executor.report import read_log_bytes as read_log_bytes
from finetune_operator.local.executor.watch import wait_until as wait_until
