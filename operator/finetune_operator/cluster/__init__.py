"""The control plane's cluster I/O: everything that talks to the API server.

  handlers    kopf wiring (thin): startup settings, login, indexes, job and pod events
  passes      one reconcile pass: read the cache, decide (decisions.reconcile), apply the plan
  informer    the cache over kopf's indexes; the scheduler of due passes
  kube        the API client (kubernetes_asyncio's configuration, one aiohttp session)
  auth        credentials: kubeconfig, exec plugins, in-cluster tokens, rotation
  logfollow   one followed log stream per running pod (live progress)
  events      Events posted off the pass's path
  metrics     Prometheus metrics
  waiting     a wait with a deadline that a cancel always ends (not asyncio.wait_for: 3.11 loses cancels)

May import: decisions, finetune_api, kopf, kubernetes_asyncio, aiohttp. Never the local runner.
"""
