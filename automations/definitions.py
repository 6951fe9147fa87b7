"""The pipeline's automations, as code.

Triggers match on the event name and the `pipeline.stage` label only, never on
a URI scheme, so the same automations serve the local, emulator and gcp
profiles. One flow run per event: `for_each` on the object URI, threshold 1.

Recovery: a transform or load run that ends Crashed or Failed, and a landing
automation whose action fails (the server never retries those), start the
`recover` deployment, which re-emits the object within an attempt budget and
reports `pipeline.recovery.exhausted` when the budget is spent.

Alerts (`alert_automations`) always exist: with a notification block (TAXI_ALERT_BLOCK)
they send through it, without one their action does nothing, and the
automation's own `prefect.automation.triggered` event (in the UI's event feed)
is the only trace. They fire on a transform, load or download run that ended
Failed or Crashed, on any `prefect.automation.action.failed`, on a file whose
rows were all rejected (`pipeline.object.all_rejected`: triggers match labels,
never payload fields, so the transform emits a distinct event), on
`pipeline.recovery.exhausted`, and proactively when no raw object has landed
for TAXI_ALERT_NO_DATA_HOURS.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect.automations import Automation
from prefect.events.actions import ActionTypes, DoNothing, RunDeployment, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture

from taxi_pipeline import events

RAW_LANDED = "taxi-pipeline: raw object landed -> transform"
PROCESSED_LANDED = "taxi-pipeline: processed object landed -> load"
RECOVER_FAILED_RUN = "taxi-pipeline: transform/load run crashed or failed -> recover"
RECOVER_FAILED_ACTION = "taxi-pipeline: landing automation action failed -> recover"
ALERT_SUFFIX = " -> alert"
ALERT_EXHAUSTED = "taxi-pipeline: recovery exhausted -> alert"
ALERT_FAILED_RUN = "taxi-pipeline: transform/load/download run crashed or failed -> alert"
ALERT_FAILED_ACTION = "taxi-pipeline: automation action failed -> alert"
ALERT_ALL_REJECTED = "taxi-pipeline: every row of a file rejected -> alert"
ALERT_NO_DATA = "taxi-pipeline: no raw object landed -> alert"
ALERT_STACK = "taxi-pipeline: up restarted a crashed part -> alert"
ALERTS = (ALERT_FAILED_RUN, ALERT_FAILED_ACTION, ALERT_ALL_REJECTED, ALERT_EXHAUSTED,
          ALERT_NO_DATA, ALERT_STACK)

# What the recover flow is given; it reads the rest (the run's parameters, or the
# failed action's triggering event) from the API.
RECOVER_PARAMETERS: dict[str, Any] = {
    "event_id": "{{ event.id | string }}",
    "event_name": "{{ event.event }}",
    "subject": "{{ event.resource.id }}",
}

# `{{ event.id }}` must be piped through `string` or the action fails; labels are
# read with .get() so an event without one still runs (generation 0 = "current").
# A template that is only `{{ x }}` keeps x's type, so `| int` gives the flow an int.
RUN_PARAMETERS: dict[str, Any] = {
    "object_uri": "{{ event.resource.id }}",
    "generation": f"{{{{ event.resource.get('{events.LABEL_GENERATION}', 0) | int }}}}",
    "event_id": "{{ event.id | string }}",
}


def object_landed_trigger(stage: str) -> EventTrigger:
    """Fires once per `storage.object.finalized` event whose object is in `stage`."""
    return _reactive({events.OBJECT_FINALIZED}, match={events.LABEL_STAGE: stage})


def run_on_landing(name: str, stage: str, deployment_id: UUID, what: str) -> Automation:
    """Run `deployment_id` once for every new object generation in `stage`."""
    return Automation(
        name=name,
        description=f"Run the {what} deployment for every new {stage} object generation.",
        trigger=object_landed_trigger(stage),
        actions=[RunDeployment(source="selected", deployment_id=deployment_id,
                               parameters=dict(RUN_PARAMETERS), job_variables=None)],
    )


def _reactive(expect: set[str], **match: Any) -> EventTrigger:
    return EventTrigger(expect=expect, for_each={"prefect.resource.id"},
                        posture=Posture.Reactive, threshold=1, within=timedelta(0), **match)


def recovery_automations(watched_deployment_ids: list[UUID],
                         recover_deployment_id: UUID) -> list[Automation]:
    """Failed/crashed transform and load runs, and failed landing actions -> recover."""
    run_recover = [RunDeployment(source="selected", deployment_id=recover_deployment_id,
                                 parameters=dict(RECOVER_PARAMETERS), job_variables=None)]
    return [
        Automation(
            name=RECOVER_FAILED_RUN,
            description="Re-run the object of a transform or load run that ended Crashed or "
                        "Failed (bounded attempts per object generation).",
            trigger=_reactive(
                {"prefect.flow-run.Crashed", "prefect.flow-run.Failed"},
                match_related={"prefect.resource.role": "deployment",
                               "prefect.resource.id": [f"prefect.deployment.{d}"
                                                       for d in watched_deployment_ids]}),
            actions=list(run_recover),
        ),
        Automation(
            name=RECOVER_FAILED_ACTION,
            description="Re-emit the object whose landing automation could not start its run "
                        "(for example the server answered 503).",
            # Only the landing automations: a failing recover action must not recover itself.
            trigger=_reactive({"prefect.automation.action.failed"},
                              match={"prefect.resource.name": [RAW_LANDED, PROCESSED_LANDED]}),
            actions=list(run_recover),
        ),
    ]


def alert_action(block_document_id: UUID | None, subject: str, body: str) -> ActionTypes:
    """Send through the block when one is configured; otherwise do nothing (the
    automation still fires, and its `prefect.automation.triggered` event is the log)."""
    if block_document_id is None:
        return DoNothing()
    return SendNotification(block_document_id=block_document_id, subject=subject, body=body)


def _alert(name: str, description: str, trigger: EventTrigger, block_document_id: UUID | None,
           subject: str, body: str) -> Automation:
    return Automation(name=name, description=description, trigger=trigger,
                      actions=[alert_action(block_document_id, subject, body)])


def alert_automations(watched_deployment_ids: list[UUID], block_document_id: UUID | None,
                      no_data_hours: float) -> list[Automation]:
    """Every alert; `watched_deployment_ids` are the transform, load and download deployments.

    `no_data_hours` <= 0 leaves out the proactive "no raw object landed" alert.
    """
    found = [
        _alert(ALERT_FAILED_RUN,
               "Tell a person when a transform, load or download run ends Failed or Crashed.",
               _reactive({"prefect.flow-run.Crashed", "prefect.flow-run.Failed"},
                         match_related={"prefect.resource.role": "deployment",
                                        "prefect.resource.id": [f"prefect.deployment.{d}"
                                                                for d in watched_deployment_ids]}),
               block_document_id,
               "taxi-pipeline: flow run {{ flow_run.name }} {{ flow_run.state.name }}",
               "Flow run {{ flow_run.name }} ({{ event.resource.id }}) of deployment "
               "{{ deployment.name }} ended {{ flow_run.state.name }}: "
               "{{ flow_run.state.message }}"),
        _alert(ALERT_FAILED_ACTION,
               "Tell a person when an automation's action failed (the server never retries "
               "those).",
               # Not the alerts' own actions: a failing notification must not alert itself.
               _reactive({"prefect.automation.action.failed"},
                         match={"prefect.resource.name": f"!*{ALERT_SUFFIX}"}),
               block_document_id,
               "taxi-pipeline: automation {{ event.resource['prefect.resource.name'] }} "
               "action failed",
               "{{ event.payload.reason }}"),
        _alert(ALERT_ALL_REJECTED,
               "Tell a person when every row of a raw file was rejected by the transform.",
               _reactive({events.OBJECT_ALL_REJECTED}),
               block_document_id,
               "taxi-pipeline: every row of {{ event.resource.id }} rejected",
               "{{ event.payload.rows_rejected }} of {{ event.payload.rows_in }} rows rejected "
               "({{ event.payload.rejected_by_reason }}); rejects: "
               "{{ event.payload.rejects_uri }}"),
        _alert(ALERT_EXHAUSTED,
               "Tell a person when automatic recovery of an object gave up.",
               _reactive({events.RECOVERY_EXHAUSTED}),
               block_document_id,
               "taxi-pipeline: {{ event.resource.id }} needs a person",
               "{{ event.payload.message }}"),
        _alert(ALERT_STACK,
               "Tell a person when `taxi-pipeline up` restarted a part that crashed (server, "
               "worker, bridge, fork server, PostgreSQL, exporter), or gave up on one: the "
               "pipeline healed, but something made it crash.",
               _reactive({events.STACK_RESTARTED, events.STACK_GAVE_UP}),
               block_document_id,
               "taxi-pipeline: {{ event.event }} {{ event.resource['pipeline.stack.part'] }}",
               "{{ event.resource.id }}: exit code {{ event.payload.exit_code }}, "
               "{{ event.payload.crashes_in_window }} crash(es) in "
               "{{ event.payload.window_seconds }} s; log {{ event.payload.log }}"),
    ]
    if no_data_hours > 0:
        found.append(_alert(
            ALERT_NO_DATA,
            f"Tell a person when no raw object has landed for {no_data_hours:g} hours.",
            no_raw_landed_trigger(no_data_hours),
            block_document_id,
            f"taxi-pipeline: no raw object landed in {no_data_hours:g} hours",
            f"No `{events.OBJECT_FINALIZED}` event for a raw object in the last "
            f"{no_data_hours:g} hours (TAXI_ALERT_NO_DATA_HOURS)."))
    return found


def no_raw_landed_trigger(hours: float) -> EventTrigger:
    """Proactive: fires when fewer than one raw `storage.object.finalized` arrived in `hours`.

    No `for_each`: the absence is of any raw object at all, not of one object.
    """
    return EventTrigger(expect={events.OBJECT_FINALIZED},
                        match={events.LABEL_STAGE: events.STAGE_RAW},
                        posture=Posture.Proactive, threshold=1,
                        within=timedelta(hours=hours))


def pipeline_automations(transform_deployment_id: UUID, load_deployment_id: UUID,
                         recover_deployment_id: UUID | None = None,
                         alert_block_id: UUID | None = None,
                         download_deployment_id: UUID | None = None,
                         no_data_hours: float = 0.0) -> list[Automation]:
    found = [
        run_on_landing(RAW_LANDED, events.STAGE_RAW, transform_deployment_id, "transform"),
        run_on_landing(PROCESSED_LANDED, events.STAGE_PROCESSED, load_deployment_id, "load"),
    ]
    if recover_deployment_id is not None:
        found += recovery_automations([transform_deployment_id, load_deployment_id],
                                      recover_deployment_id)
    watched = [transform_deployment_id, load_deployment_id]
    if download_deployment_id is not None:
        watched.append(download_deployment_id)
    found += alert_automations(watched, alert_block_id, no_data_hours)
    return found
