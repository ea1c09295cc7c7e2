"""`spec.model.fromJob`: the gate before every launch of a pod that reads the source job's export.

Pure. The source FineTuneJob (same namespace) is read by the caller into `observed.source_job`.
Missing or not Succeeded yet -> wait (WaitingForSourceJob, looked at again every pending_interval:
GitOps applies both jobs at once); Failed -> SourceJobFailed; Succeeded without a
sentence-transformers export -> SourceExportMissing. Once training has started from a source, the
claim recorded in status is used by every later attempt, whatever happens to the source job.
"""

from __future__ import annotations

from typing import Any

from finetune_api.spec import FineTuneSpec, SpecError, parse_spec
from finetune_operator.decisions import status as S
from finetune_operator.decisions.builders import ROLE_EXPORT, SourceWorkspace, claim_name
from finetune_operator.decisions.observe import Observed, PodObservation
from finetune_operator.decisions.plan import Pass, Plan


def recorded_source(status: dict[str, Any], job: str) -> SourceWorkspace | None:
    """The fromJob source recorded in status when training first started from it, if any."""
    rec = status.get("source") or {}
    if isinstance(rec, dict) and rec.get("job") == job and rec.get("claim"):
        return SourceWorkspace(job=job, claim=str(rec["claim"]))
    return None


def source_workspace(
    p: Pass, spec: FineTuneSpec, role: str, observed: Observed, live: list[PodObservation]
) -> SourceWorkspace | Plan:
    """The fromJob source's workspace when its export can be mounted, else the waiting/failed plan."""
    name, me = str(spec.model.from_job), str(p.job["metadata"]["name"])
    field = "spec.model.fromJob"
    if name == me:
        return p.invalid(live, S.REASON_INVALID_SPEC, f"{field}: a job cannot continue from itself")
    recorded = recorded_source(p.st, name)
    if recorded is not None:
        # every later attempt (a resumed training pod, the export) starts from the model the first
        # training pod started from, even if the source job has been deleted (its claim is kept
        # by default) or re-created since
        if observed.source_claim_exists is False:
            return p.fail(live, S.REASON_SOURCE_EXPORT_MISSING,
                         f"PersistentVolumeClaim {recorded.claim}, the workspace of source job {name} ({field}) "
                         "this job started from, is gone (deleted with the source job under reclaimPolicy "
                         "Delete?); the model cannot be continued without it")  # fmt: skip
        return recorded
    src = observed.source_job
    if src is None:
        ns = p.job["metadata"].get("namespace") or "default"
        return wait_for_source(p, role, f"waiting for FineTuneJob {name} ({field}): "
                                         f"it does not exist in namespace {ns}")  # fmt: skip
    try:
        src_spec: FineTuneSpec | None = parse_spec(src.get("spec"))
    except SpecError:
        src_spec = None
    claim = claim_name(name, src_spec) if src_spec is not None else None
    if claim is not None and claim == claim_name(me, spec):
        return p.invalid(live, S.REASON_INVALID_SPEC,
                        f"spec.storage.claimName: {claim} is also the workspace of the source job {name} "
                        f"({field}); the two jobs would share checkpoints, final/ and export/: "
                        "give this job its own claim")  # fmt: skip
    sst = src.get("status") or {}
    phase = sst.get("phase")
    if phase == S.PHASE_FAILED:
        return p.fail(live, S.REASON_SOURCE_FAILED,
                     f"source job {name} ({field}) failed ({sst.get('reason')}): {sst.get('message')}")  # fmt: skip
    if phase != S.PHASE_SUCCEEDED:
        state = f"{phase} ({sst['reason']})" if phase and sst.get("reason") else (phase or "not started")
        return wait_for_source(
            p, role, f"waiting for FineTuneJob {name} ({field}) to succeed; it is {state}"
        )
    if src_spec is None or claim is None:
        return p.fail(live, S.REASON_SOURCE_EXPORT_MISSING,
                     f"source job {name} ({field}) succeeded but its spec is no longer valid")  # fmt: skip
    formats = (sst.get("export") or {}).get("formats")
    formats = list(formats) if isinstance(formats, list) else list(src_spec.export.formats)
    if "sentence-transformers" not in formats:
        return p.fail(live, S.REASON_SOURCE_EXPORT_MISSING,
                     f"source job {name} ({field}) succeeded without a sentence-transformers export "
                     f"(it exported {', '.join(map(str, formats)) or 'nothing'}); a continuation starts from that "
                     f"format: add sentence-transformers to {name}'s spec.export.formats and run it again")  # fmt: skip
    return SourceWorkspace(job=name, claim=claim)


def wait_for_source(p: Pass, role: str, message: str) -> Plan:
    phase = S.PHASE_EXPORTING if role == ROLE_EXPORT else S.PHASE_PENDING
    p.phase(phase, S.REASON_WAITING_FOR_SOURCE, message, announce=True)
    p.plan.requeue_after = p.settings.pending_interval
    return p.finish()
