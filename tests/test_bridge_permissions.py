"""The bridge needs only roles/pubsub.subscriber on its subscription.

Pub/Sub's IAM is not emulated (the emulator answers 501 to testIamPermissions),
so the real-GCP answers are stubbed here; the emulator path runs in the bridge
integration tests.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from google.api_core import exceptions as gexc

from pubsub_bridge.pubsub_source import CONSUME_PERMISSION, PubSubSource


class StubSubscriber:
    def __init__(self, granted: list[str] | None, exists: bool = True) -> None:
        self.granted = granted
        self.exists = exists
        self.calls: list[str] = []

    def test_iam_permissions(self, request: dict[str, Any], timeout: float) -> Any:
        self.calls.append("test_iam_permissions")
        if self.granted is None:
            raise gexc.MethodNotImplemented("emulator")
        assert request["permissions"] == [CONSUME_PERMISSION]
        return SimpleNamespace(permissions=[p for p in self.granted
                                            if p in request["permissions"]])

    def get_subscription(self, subscription: str, timeout: float) -> Any:
        self.calls.append("get_subscription")
        if not self.exists:
            raise gexc.NotFound(subscription)
        return SimpleNamespace(name=subscription)


def source_with(client: StubSubscriber) -> PubSubSource:
    source = PubSubSource.__new__(PubSubSource)
    source.client = client  # type: ignore[assignment]
    source.path = "projects/p/subscriptions/taxi-objects-bridge"
    source.future = None
    return source


def test_a_subscriber_may_start_without_reading_the_subscription() -> None:
    client = StubSubscriber([CONSUME_PERMISSION])
    source_with(client).can_consume()
    assert client.calls == ["test_iam_permissions"]  # never get_subscription (needs viewer)


def test_no_consume_permission_says_what_to_grant() -> None:
    with pytest.raises(RuntimeError, match=r"roles/pubsub.subscriber"):
        source_with(StubSubscriber([])).can_consume()


def test_the_emulator_has_no_iam_so_the_subscription_is_read() -> None:
    client = StubSubscriber(None)
    source_with(client).can_consume()
    assert client.calls == ["test_iam_permissions", "get_subscription"]
    with pytest.raises(RuntimeError, match="gcp setup"):
        source_with(StubSubscriber(None, exists=False)).can_consume()


def test_the_health_check_uses_the_same_probe() -> None:
    client = StubSubscriber([])
    with pytest.raises(RuntimeError):
        source_with(client).check()
    assert "get_subscription" not in client.calls
