"""The embedded default: `finetune-operator local FILE...` runs FineTuneJobs on this machine with
the operator's own decisions, pods as local processes and workspaces as directories.

  runner      LocalRunner and `main`: drives decisions.reconcile over the world, applies its plans
  jobfiles    the files given: FineTuneJobs read, checked to run together, inputs staged
  world       the local world: the jobs, their statuses and status files, their pods and claims
  display     the screen: a row per change, Events, resume lines, the end report
  interrupt   Ctrl-C and SIGTERM: checkpoint and stop, then stop at once; attempts closed
  story       what carries across runs: status.json reloaded, an interrupted attempt closed
  progress    the terminal's live line (a progress bar on a tty, plain lines elsewhere)
  executor/   runs pod specs as local process groups (also the test kubelets' runtime):
              start, watch, stop and report behind one LocalPodExecutor

Imports run one way: runner -> interrupt -> display -> world -> executor; story and progress
are leaves beside them (story reads the world's type only).
May import: decisions, finetune_api. Never the cluster I/O (no kopf, no API client).
"""
