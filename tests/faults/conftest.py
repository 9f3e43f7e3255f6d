"""Fault tests stop and start the real backend servers, so they run after every other test."""

from __future__ import annotations

import pathlib

import pytest

HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.faults)
    items.sort(key=lambda item: item.path.is_relative_to(HERE))  # stable: order otherwise kept
