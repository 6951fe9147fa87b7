"""What `deploy` applies: the automations' triggers, postures, thresholds and actions."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

from prefect.events.actions import DoNothing, RunDeployment, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture

from automations.definitions import (
    ALERT_ALL_REJECTED,
    ALERT_EXHAUSTED,
    ALERT_FAILED_ACTION,
    ALERT_FAILED_RUN,
    ALERT_NO_DATA,
    ALERTS,
    PROCESSED_LANDED,
    RAW_LANDED,
    RECOVER_FAILED_ACTION,
    RECOVER_FAILED_RUN,
    pipeline_automations,
)
from taxi_pipeline import events
from taxi_pipeline.settings import Settings

TRANSFORM, LOAD, RECOVER, DOWNLOAD, BLOCK = (uuid4() for _ in range(5))


def by_name(block: object = None, hours: float = 24.0) -> dict[str, object]:
    found = pipeline_automations(TRANSFORM, LOAD, RECOVER, block,  # type: ignore[arg-type]
                                 download_deployment_id=DOWNLOAD, no_data_hours=hours)
    assert len({a.name for a in found}) == len(found)
    return {a.name: a for a in found}


def trigger(automation: object) -> EventTrigger:
    found = automation.trigger  # type: ignore[attr-defined]
    assert isinstance(found, EventTrigger)
    return found


def test_every_alert_exists_without_a_block_and_does_nothing() -> None:
    automations = by_name(block=None)
    assert set(automations) == {RAW_LANDED, PROCESSED_LANDED, RECOVER_FAILED_RUN,
                                RECOVER_FAILED_ACTION, *ALERTS}
    for name in ALERTS:
        actions = automations[name].actions  # type: ignore[attr-defined]
        assert [type(a) for a in actions] == [DoNothing]


def test_with_a_block_every_alert_sends_through_it() -> None:
    automations = by_name(block=BLOCK)
    for name in ALERTS:
        (action,) = automations[name].actions  # type: ignore[attr-defined]
        assert isinstance(action, SendNotification)
        assert action.block_document_id == BLOCK
        assert action.subject.startswith("taxi-pipeline: ")
        assert action.body
    for name in (RAW_LANDED, PROCESSED_LANDED, RECOVER_FAILED_RUN, RECOVER_FAILED_ACTION):
        assert all(isinstance(a, RunDeployment)
                   for a in automations[name].actions)  # type: ignore[attr-defined]


def test_failed_or_crashed_transform_load_and_download_runs_alert() -> None:
    t = trigger(by_name()[ALERT_FAILED_RUN])
    assert t.posture == Posture.Reactive and t.threshold == 1
    assert t.expect == {"prefect.flow-run.Crashed", "prefect.flow-run.Failed"}
    assert t.for_each == {"prefect.resource.id"}
    assert t.match_related.root["prefect.resource.role"] == "deployment"  # type: ignore[union-attr]
    assert set(t.match_related.root["prefect.resource.id"]) == {  # type: ignore[union-attr]
        f"prefect.deployment.{d}" for d in (TRANSFORM, LOAD, DOWNLOAD)}
    # Recovery keeps watching transform and load only.
    recover = trigger(by_name()[RECOVER_FAILED_RUN])
    assert set(recover.match_related.root["prefect.resource.id"]) == {  # type: ignore[union-attr]
        f"prefect.deployment.{d}" for d in (TRANSFORM, LOAD)}


def test_a_failed_action_alerts_unless_it_is_an_alerts_own() -> None:
    t = trigger(by_name()[ALERT_FAILED_ACTION])
    assert t.posture == Posture.Reactive and t.threshold == 1
    assert t.expect == {"prefect.automation.action.failed"}
    from prefect.server.events.schemas.events import matches
    (pattern,) = [t.match.root["prefect.resource.name"]]
    assert isinstance(pattern, str)
    for name in (RAW_LANDED, PROCESSED_LANDED, RECOVER_FAILED_RUN, "someone else's"):
        assert matches(pattern, name)
    for name in ALERTS:
        assert not matches(pattern, name)


def test_all_rejected_and_recovery_exhausted_alert_on_their_events() -> None:
    automations = by_name()
    for name, event in ((ALERT_ALL_REJECTED, events.OBJECT_ALL_REJECTED),
                        (ALERT_EXHAUSTED, events.RECOVERY_EXHAUSTED)):
        t = trigger(automations[name])
        assert t.expect == {event}
        assert t.posture == Posture.Reactive and t.threshold == 1
        assert t.for_each == {"prefect.resource.id"}


def test_a_part_up_restarted_or_gave_up_on_alerts() -> None:
    from automations.definitions import ALERT_STACK

    t = trigger(by_name()[ALERT_STACK])
    assert t.expect == {events.STACK_RESTARTED, events.STACK_GAVE_UP}
    assert t.posture == Posture.Reactive and t.threshold == 1
    assert t.for_each == {"prefect.resource.id"}


def test_no_raw_object_for_hours_is_a_proactive_alert() -> None:
    t = trigger(by_name(hours=6)[ALERT_NO_DATA])
    assert t.posture == Posture.Proactive
    assert t.expect == {events.OBJECT_FINALIZED}
    assert t.match.root == {events.LABEL_STAGE: events.STAGE_RAW}
    assert t.threshold == 1 and t.within == timedelta(hours=6)
    assert not t.for_each


def test_no_data_alert_is_left_out_at_zero_hours_and_defaults_to_a_day(tmp_path: object) -> None:
    assert ALERT_NO_DATA not in by_name(hours=0)
    assert Settings(profile="local", home=tmp_path).alert_no_data_hours == 24.0  # type: ignore[arg-type]
