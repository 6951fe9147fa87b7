"""Operator commands: what happened to each object, re-emit, reconcile, backfill, dead letters."""
