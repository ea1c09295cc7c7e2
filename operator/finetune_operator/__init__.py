"""finetune-operator, the control plane: kopf handlers over pure decisions. Never imports torch.

  decisions   pure: reconcile(job, observed, now) -> Plan, and what it is made of (observe,
              plan, attempts, gang, fromjob, status, builders). No kopf, no client, no I/O.
  cluster     the cluster's I/O: kopf handlers, the API client and its credentials, the informer
              over kopf's indexes, the log follower, Events, metrics.
  local       the embedded default (`finetune-operator local`): the same decisions driven with
              pods run as local processes.
  cli         `finetune-operator run` (cluster) and `finetune-operator local` (local).

Arrows point down only: cli -> cluster | local -> decisions -> finetune_api (the vocabulary both
planes share); cluster and local never import each other (import-linter enforces all of it).
"""

__version__ = "0.1.0"
