"""The control plane's pure decisions: `reconcile(job, observed, now, settings) -> Plan`.

  reconcile   the lifecycle: launch, watch, retry or stop, export, finish; one Pass per call
  running     what a live pod says of the job: where it is, or who holds it
  observe     what a worker pod's status and log say (results, progress, who holds it)
  plan        the Plan (creates, deletes, status patch, Events, requeue) and the Pass that builds it
  attempts    status.attempts: endings recorded once, counters, live progress
  gang        multi-node attempts: members, their Service, a gang folded into one observation
  fromjob     spec.model.fromJob: the source job's workspace gate
  status      phases, conditions, the minimal status patch
  builders    the children as plain dicts: pods, claims, Events, labels

May import: finetune_api and the standard library. No kopf, no API client, no aiohttp, no
asyncio, no clock (`now` is passed in), no files or processes: every decision is a table a unit
test can check (import-linter enforces the imports).
"""
