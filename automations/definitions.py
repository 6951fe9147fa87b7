"""The pipeline's automations, as code.

Triggers match on the event name and the `pipeline.stage` label only, never on
a URI scheme, so the same automations serve the local, emulator and gcp
profiles. One flow run per event: `for_each` on the object URI, threshold 1.

Recovery: a transform or load run that ends Crashed or Failed, and a landing
automation whose action fails (the server never retries those), start the
`recover` deployment, which re-emits the object within an attempt budget and
reports `pipeline.recovery.exhausted` when the budget is spent; that event is
forwarded to a notification block when one is configured.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect.automations import Automation
from prefect.events.actions import RunDeployment, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture

from taxi_pipeline import events

RAW_LANDED = "taxi-pipeline: raw object landed -> transform"
PROCESSED_LANDED = "taxi-pipeline: processed object landed -> load"
RECOVER_FAILED_RUN = "taxi-pipeline: transform/load run crashed or failed -> recover"
RECOVER_FAILED_ACTION = "taxi-pipeline: landing automation action failed -> recover"
ALERT_EXHAUSTED = "taxi-pipeline: recovery exhausted -> alert"

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


def alert_automation(block_document_id: UUID) -> Automation:
    """`pipeline.recovery.exhausted` -> the configured notification block."""
    return Automation(
        name=ALERT_EXHAUSTED,
        description="Tell a person when automatic recovery of an object gave up.",
        trigger=_reactive({events.RECOVERY_EXHAUSTED}),
        actions=[SendNotification(
            block_document_id=block_document_id,
            subject="taxi-pipeline: {{ event.resource.id }} needs a person",
            body="{{ event.payload.message }}",
        )],
    )


def pipeline_automations(transform_deployment_id: UUID, load_deployment_id: UUID,
                         recover_deployment_id: UUID | None = None,
                         alert_block_id: UUID | None = None) -> list[Automation]:
    found = [
        run_on_landing(RAW_LANDED, events.STAGE_RAW, transform_deployment_id, "transform"),
        run_on_landing(PROCESSED_LANDED, events.STAGE_PROCESSED, load_deployment_id, "load"),
    ]
    if recover_deployment_id is not None:
        found += recovery_automations([transform_deployment_id, load_deployment_id],
                                      recover_deployment_id)
    if alert_block_id is not None:
        found.append(alert_automation(alert_block_id))
    return found
