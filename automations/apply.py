"""Create or update automations by name, so applying twice leaves one of each.

`Automation.create()` twice makes two automations (and two runs per event), so
apply looks each one up by name first, updates the first match and deletes
any extra copies a past mistake left behind.
"""

from __future__ import annotations

import logging

from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore

log = logging.getLogger(__name__)


async def apply_automations(automations: list[Automation],
                            owned_prefix: str = "taxi-pipeline: ") -> dict[str, str]:
    """Returns {name: "created" | "updated" | "deleted"}.

    Automations whose name starts with `owned_prefix` but are no longer defined
    (an alert block that was unset, a renamed automation) are deleted.
    """
    outcome: dict[str, str] = {}
    wanted = {a.name for a in automations}
    async with get_client() as client:
        for stale in await client.read_automations():
            if stale.name.startswith(owned_prefix) and stale.name not in wanted:
                await client.delete_automation(stale.id)
                outcome[stale.name] = "deleted"
                log.info("automation %r deleted (no longer defined)", stale.name)
        for automation in automations:
            existing = await client.read_automations_by_name(automation.name)
            core = AutomationCore(**automation.model_dump(exclude={"id", "owner_resource"}))
            if not existing:
                await client.create_automation(core)
                outcome[automation.name] = "created"
            else:
                await client.update_automation(existing[0].id, core)
                for extra in existing[1:]:
                    await client.delete_automation(extra.id)
                    log.warning("deleted duplicate automation %r (%s)", extra.name, extra.id)
                outcome[automation.name] = "updated"
            log.info("automation %r %s", automation.name, outcome[automation.name])
    return outcome
