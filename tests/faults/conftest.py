"""Fault tests stop and start the machine's real PostgreSQL and Redis servers, so they are
opt-in: they run only with ``PRISM_FAULT_TESTS=1`` (``make test-faults``; CI sets it), after
every other test, and the run says so before the first test starts. Otherwise they are
deselected (not skipped, so ``PRISM_REQUIRE_BACKENDS=1`` does not count them as failures).
Under pytest-xdist (``make test``), tests/conftest.py's scheduler holds them back until every
other worker has exited, then runs them in the last one."""

from __future__ import annotations

import os
import pathlib

import pytest

HERE = pathlib.Path(__file__).parent
ENABLED = os.environ.get("PRISM_FAULT_TESTS") == "1"
deselected: list[pytest.Item] = []
ANNOUNCEMENT = (
    "faults: PRISM_FAULT_TESTS=1: tests/faults will stop and restart the local PostgreSQL and Redis "
    "servers at the end of this run, with no other test running (and leave both running)"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    faults = [item for item in items if item.path.is_relative_to(HERE)]
    if not ENABLED:
        if faults:
            deselected.extend(faults)
            config.hook.pytest_deselected(items=faults)
            items[:] = [item for item in items if not item.path.is_relative_to(HERE)]
        return
    for item in faults:
        item.add_marker(pytest.mark.faults)
    items.sort(key=lambda item: item.path.is_relative_to(HERE))  # stable: order otherwise kept


# Printed under "collected N items", before any test runs; unlike pytest_report_header it is
# called for this conftest (loaded during collection) and shown under -q as well.
def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> str | None:
    if ENABLED and any(item.path.is_relative_to(HERE) for item in items):
        return ANNOUNCEMENT
    if deselected:
        return (
            f"faults: {len(deselected)} tests in tests/faults deselected: they restart the local "
            "PostgreSQL and Redis servers; run them with make test-faults (PRISM_FAULT_TESTS=1)"
        )
    return None
