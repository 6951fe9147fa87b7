"""What Google Cloud accepts as names of the resources the pipeline uses: the one place
that knows.

Settings are checked against these rules when a process starts
(`Settings.validate_for_profile`), and the BigQuery warehouse checks every identifier
it formats into SQL with the same rules. Sources of the rules:

- project id: https://cloud.google.com/resource-manager/docs/creating-managing-projects
  (6-30 lowercase letters, digits, hyphens; starts with a letter; no trailing hyphen).
  A legacy domain-scoped id (`example.com:my-project`) is accepted too.
- bucket: https://cloud.google.com/storage/docs/buckets#naming (3-63 chars, up to 222
  with dots; lowercase letters, digits, - _ .; starts and ends with a letter or digit;
  not an IP address; not `goog...`; no `google` or look-alikes).
- Pub/Sub topic and subscription ids: the `name` fields of Topic and Subscription in
  the Pub/Sub API (3-255 chars, starts with a letter, letters digits - _ . ~ + %, not
  `goog...`).
- BigQuery dataset, table and column names: https://cloud.google.com/bigquery/docs/datasets,
  .../tables, .../schemas. Tables and columns are held to a subset of what BigQuery
  allows (ASCII letters, digits, `_`, and `-` in tables) because the warehouse formats
  them into SQL.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field


def _no_extra_rule(_value: str) -> str | None:
    return None


@dataclass(frozen=True)
class NameRule:
    """One kind of name: its pattern, the rule in words, and a valid example."""

    what: str
    pattern: re.Pattern[str]
    rule: str
    example: str
    # Checks a pattern cannot express; says what is wrong, or None.
    extra: Callable[[str], str | None] = field(default=_no_extra_rule)

    def problem(self, value: str) -> str | None:
        """Why `value` is not a valid name of this kind, or None if it is."""
        if not self.pattern.fullmatch(value):
            return self.rule
        return self.extra(value)

    def is_valid(self, value: str) -> bool:
        return self.problem(value) is None

    def check(self, value: str) -> str:
        """`value` itself, or ValueError naming the rule and a valid example."""
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(f"invalid {self.what} {value!r}: {problem} "
                             f"(for example {self.example})")
        return value


def _bucket_extra(value: str) -> str | None:
    parts = value.split(".")
    if len(parts) == 1 and len(value) > 63:
        return "a bucket name without dots has at most 63 characters"
    if any(len(part) > 63 for part in parts):
        return "each dot-separated part of a bucket name has at most 63 characters"
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        pass
    else:
        return "a bucket name must not be an IP address"
    if value.startswith("goog"):
        return "a bucket name must not start with 'goog'"
    if re.search(r"g[o0][o0]g[l1]e", value):
        return "a bucket name must not contain 'google' or a look-alike such as 'g00gle'"
    return None


def _pubsub_extra(value: str) -> str | None:
    if value.startswith("goog"):
        return "a Pub/Sub id must not start with 'goog'"
    return None


PROJECT_ID = NameRule(
    what="GCP project id",
    pattern=re.compile(r"(?:[a-z][a-z0-9.-]*[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]"),
    rule="a project id has 6-30 characters: lowercase letters, digits and hyphens, "
         "starting with a letter and not ending with a hyphen",
    example="my-project-123",
)
BUCKET = NameRule(
    what="GCS bucket name",
    pattern=re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]"),
    rule="a bucket name has 3-63 characters (up to 222 with dots): lowercase letters, "
         "digits, hyphens, underscores and dots, starting and ending with a letter or digit",
    example="my-project-123-taxi",
    extra=_bucket_extra,
)
PUBSUB_TOPIC = NameRule(
    what="Pub/Sub topic id",
    pattern=re.compile(r"[A-Za-z][A-Za-z0-9._~+%-]{2,254}"),
    rule="a topic id has 3-255 characters: letters, digits and - _ . ~ + %, starting "
         "with a letter (not 'goog')",
    example="taxi-objects",
    extra=_pubsub_extra,
)
PUBSUB_SUBSCRIPTION = NameRule(
    what="Pub/Sub subscription id",
    pattern=PUBSUB_TOPIC.pattern,
    rule="a subscription id has 3-255 characters: letters, digits and - _ . ~ + %, "
         "starting with a letter (not 'goog')",
    example="taxi-objects-bridge",
    extra=_pubsub_extra,
)
DATASET = NameRule(
    what="BigQuery dataset name",
    pattern=re.compile(r"[A-Za-z0-9_]{1,1024}"),
    rule="a dataset name has 1-1024 characters: letters, digits and _",
    example="taxi",
)
TABLE = NameRule(
    what="BigQuery table name",
    pattern=re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,1000}"),
    rule="a table name has 1-1001 characters: letters, digits, _ and -, not starting "
         "with -",
    example="trips",
)
COLUMN = NameRule(
    what="BigQuery column name",
    pattern=re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,299}"),
    rule="a column name has 1-300 characters: letters, digits and _, not starting "
         "with a digit",
    example="pickup_datetime",
)
