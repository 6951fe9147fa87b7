"""The pipeline's automations, as code.

Triggers match on the event name and the `pipeline.stage` label only, never on
a URI scheme, so the same automations serve the local, emulator and gcp
profiles. One flow run per event: `for_each` on the object URI, threshold 1.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from prefect.automations import Automation
from prefect.events.actions import RunDeployment
from prefect.events.schemas.automations import EventTrigger, Posture

from taxi_pipeline import events

RAW_LANDED = "taxi-pipeline: raw object landed -> transform"
PROCESSED_LANDED = "taxi-pipeline: processed object landed -> load"

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
    return EventTrigger(
        expect={events.OBJECT_FINALIZED},
        match={events.LABEL_STAGE: stage},
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),
    )


def run_on_landing(name: str, stage: str, deployment_id: UUID, what: str) -> Automation:
    """Run `deployment_id` once for every new object generation in `stage`."""
    return Automation(
        name=name,
        description=f"Run the {what} deployment for every new {stage} object generation.",
        trigger=object_landed_trigger(stage),
        actions=[RunDeployment(source="selected", deployment_id=deployment_id,
                               parameters=dict(RUN_PARAMETERS), job_variables=None)],
    )


def pipeline_automations(transform_deployment_id: UUID,
                         load_deployment_id: UUID) -> list[Automation]:
    return [
        run_on_landing(RAW_LANDED, events.STAGE_RAW, transform_deployment_id, "transform"),
        run_on_landing(PROCESSED_LANDED, events.STAGE_PROCESSED, load_deployment_id, "load"),
    ]
