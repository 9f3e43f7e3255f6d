"""The pattern-by-backend matrix of the conformance suites, printed at the end of the run.

A suite module takes part in the matrix by defining ``MATRIX = (pattern, {param value:
backend})``: a test's backend is the one its parameters name; a test with no backend
parameter covers every backend it checked. Cases are grouped by ``@pytest.mark.case(group)``.
A test reports a capability the backend does not declare, checked for its clean refusal or
its honest absence, with ``request.node.user_properties.append(("verdict", "refused"))``,
and a cross-backend test names the backends it checked with ``("backends", [...])``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pytest

OUTCOME_RANK = {"": -1, "passed": 0, "refused": 1, "skipped": 2, "failed": 3}


@dataclass
class Case:
    pattern: str
    group: str
    backends: list[str]
    outcome: str = ""  # none yet: not run (deselected)


class Matrix:
    def __init__(self) -> None:
        self.cases: dict[str, Case] = {}
        self.columns: dict[str, list[str]] = {}  # pattern → backends, in suite order

    def collect(self, item: pytest.Item) -> None:
        spec = getattr(item.module, "MATRIX", None) if isinstance(item, pytest.Function) else None
        if spec is None:
            return
        pattern, backend_of = spec
        self.columns.setdefault(pattern, list(dict.fromkeys(backend_of.values())))
        params = getattr(getattr(item, "callspec", None), "params", {})
        named = [backend_of[v] for v in params.values() if isinstance(v, str) and v in backend_of]
        marker = item.get_closest_marker("case")
        group = marker.args[0] if marker else "all cases"
        self.cases[item.nodeid] = Case(pattern, group, named or self.columns[pattern])

    def record(self, report: pytest.TestReport) -> None:
        """The case's outcome is the worst of its phases (setup, call, teardown)."""
        case = self.cases.get(report.nodeid)
        if case is None:
            return
        properties = dict(report.user_properties)
        case.backends = list(properties.get("backends", case.backends))
        outcome = report.outcome
        if outcome == "passed" and properties.get("verdict") == "refused":
            outcome = "refused"
        case.outcome = max(case.outcome, outcome, key=OUTCOME_RANK.__getitem__)

    def table(self) -> list[str]:
        lines: list[str] = []
        for pattern, backends in self.columns.items():
            cells: dict[str, dict[str, defaultdict[str, int]]] = {}
            for case in self.cases.values():
                if case.pattern != pattern or not case.outcome:
                    continue
                row = cells.setdefault(case.group, {b: defaultdict(int) for b in backends})
                for backend in case.backends:
                    row[backend][case.outcome] += 1
            if not cells:
                continue
            header = [f"{pattern} case", *backends]
            body = [[group, *(_cell(row[b]) for b in backends)] for group, row in cells.items()]
            totals: dict[str, defaultdict[str, int]] = {b: defaultdict(int) for b in backends}
            for row in cells.values():
                for b in backends:
                    for outcome, n in row[b].items():
                        totals[b][outcome] += n
            body.append(["**all**", *(_cell(totals[b]) for b in backends)])
            widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
            lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
            lines.extend(
                "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in body
            )
            lines.append("")
        return lines


def _cell(counts: dict[str, int]) -> str:
    parts = [f"{counts[o]} {o}" for o in ("passed", "refused", "failed", "skipped") if counts.get(o)]
    return ", ".join(parts) or "—"


COLLECTED = Matrix()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        COLLECTED.collect(item)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    COLLECTED.record(report)


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    lines = COLLECTED.table()
    if not lines:
        return
    terminalreporter.section("conformance matrix: cases passed / refused (capability not declared, refusal checked)")
    for line in lines:
        terminalreporter.write_line(line)
