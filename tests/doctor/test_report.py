"""The doctor's report: exit status from the worst finding, text and JSON renderings."""

from __future__ import annotations

import json

import pytest

from modelpool.doctor import Finding, Report


@pytest.mark.parametrize(
    ("levels", "code", "status"),
    [
        ([], 0, "clean"),
        (["ok", "info"], 0, "clean"),
        (["ok", "warning", "info"], 1, "warnings"),
        (["warning", "hazard", "ok"], 2, "hazards"),
    ],
)
def test_exit_status_is_the_worst_finding(levels: list[str], code: int, status: str) -> None:
    report = Report("t")
    report.add(Finding(f"c{i}", level, f"s{i}") for i, level in enumerate(levels))
    assert report.exit_code() == code
    assert json.loads(report.to_json())["status"] == status


def test_text_puts_hazards_first_with_why_and_fix() -> None:
    report = Report("title")
    report.add(
        [
            Finding("a", "ok", "fine"),
            Finding("b", "hazard", "broken", detail="because", fix="do this"),
            Finding("c", "warning", "slow"),
        ]
    )
    text = report.to_text().splitlines()
    assert text[2] == "[ HAZARD] b: broken"
    assert text[3].strip() == "why: because"
    assert text[4].strip() == "fix: do this"
    assert text[5] == "[WARNING] c: slow"
    assert text[-1].startswith("1 hazard(s), 1 warning(s), 0 note(s), 1 check(s) passed")


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="level 'bad'"):
        Finding("x", "bad", "s")
