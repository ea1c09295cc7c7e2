"""The FineTuneJob's vocabulary, shared by both planes: what the resource says and what its pods
agree on.

  spec          parse and validate a FineTuneJob (or its spec) into FineTuneSpec; every error
                names its field (kubectl explain's paths)
  inputs        spec.model and spec.dataset: what a job trains from
  fields        the field readers and checks spec is built from (quantities, names, sizes)
  training      spec.training and spec.lora: losses and their parameters, schedule, checkpoints
  distributed   spec.distributed: processes per pod, nodes, the gradient-accumulation rules
  remote        spec.credentials and remote locations (s3://, oci://): Secret references only
  contract      the operator-worker contract: exit codes, results, workspace layout, progress
                lines, the termination summary

May import: the standard library and pyyaml. Never the control plane (finetune_operator), the
data plane (finetune_worker), kopf, an API client or torch: both planes import this, so it stays
the smallest thing both can agree on (import-linter enforces it).
"""
