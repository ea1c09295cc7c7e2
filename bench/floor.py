"""The floor of bench_apiserver's (b): the least a Python controller of this design can do per job.

One watch on the FineTuneJobs of a namespace; for each ADDED, in a task of its own, the operator's
own decision (`reconcile`, pure) carried out with the operator's own client: the claim, then the
pod, then the status patch; the Events go to one background poster, as the operator's do. No kopf,
no informer, no pod or claim watches, no locks, no retries of its own, no error handling (its watch is opened
again where it ended: the API server ends a watch it finds slow to read). Its latency is what
the API server and this machine allow for the same requests; the operator's latency over it is what
kopf and the operator's machinery add.

    KUBECONFIG=... python bench/floor.py NAMESPACE     # prints "watching" once its watch is open
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from typing import Any

from finetune_api import contract
from finetune_operator.cli import tune_gc
from finetune_operator.cluster.kube import FOLLOW_TIMEOUT, Kube, resource_path
from finetune_operator.cluster.passes import settings_from_env
from finetune_operator.decisions.observe import Observed
from finetune_operator.decisions.reconcile import Settings, reconcile


async def launch(kube: Kube, job: dict[str, Any], settings: Settings, events: asyncio.Queue[dict[str, Any]]) -> None:
    plan = reconcile(job, Observed(pods=(), claim_exists=False), dt.datetime.now(dt.timezone.utc), settings)
    for obj in plan.create:
        await kube.create(obj)
    if plan.status is not None:
        meta = job["metadata"]
        await kube.patch(contract.API_VERSION, contract.PLURAL, meta["namespace"], meta["name"],
                         {"status": plan.status}, subresource="status")  # fmt: skip
    for event in plan.events:
        events.put_nowait(event)


async def post_events(kube: Kube, events: asyncio.Queue[dict[str, Any]]) -> None:
    while True:
        await kube.create(await events.get())


async def main(namespace: str) -> None:
    settings = settings_from_env()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    async with await Kube.connect() as kube:
        tasks.add(asyncio.create_task(post_events(kube, events)))  # runs until the process is killed
        path = resource_path(contract.API_VERSION, contract.PLURAL, namespace)
        rv = (await kube.request("GET", path))["metadata"]["resourceVersion"]
        print("watching", flush=True)
        while True:  # the API server ends a watch it finds slow to read (its watch cache): watch again
            resp = await kube.api.call_api(
                path, "GET", query_params=[("watch", "1"), ("resourceVersion", rv), ("allowWatchBookmarks", "true")],
                header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
                _preload_content=False, _request_timeout=FOLLOW_TIMEOUT,
            )  # fmt: skip
            async with resp:
                if resp.status != 200:  # 410 Gone: a floor re-lists no history; the run is void
                    raise SystemExit(f"floor: watch answered {resp.status}: {await resp.text()}")
                async for line in resp.content:
                    ev = json.loads(line)
                    if ev["type"] == "ERROR":  # 410 Expired: as above
                        raise SystemExit(f"floor: watch error: {ev['object']}")
                    rv = ev["object"]["metadata"]["resourceVersion"]
                    if ev["type"] == "ADDED":
                        task = asyncio.create_task(launch(kube, ev["object"], settings, events))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
            print(f"floor: the watch ended; watching again from resourceVersion {rv}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    tune_gc()  # as `finetune-operator run` does
    asyncio.run(main(sys.argv[1]))
