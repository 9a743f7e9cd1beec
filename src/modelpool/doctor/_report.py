"""What the doctor found: findings with a level, facts, and the two ways to show them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

__all__ = ["EXIT_CLEAN", "EXIT_HAZARDS", "EXIT_WARNINGS", "LEVELS", "Finding", "Report"]

#: from least to most severe: ``ok`` (checked, fine), ``info`` (worth knowing), ``warning``
#: (will cost speed or robustness), ``hazard`` (will hang, crash or corrupt)
LEVELS = ("ok", "info", "warning", "hazard")
EXIT_CLEAN, EXIT_WARNINGS, EXIT_HAZARDS = 0, 1, 2
_MARKS = {"ok": "ok", "info": "--", "warning": "WARNING", "hazard": "HAZARD"}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One check's result: ``check`` names it (stable, for ``--json`` readers), ``summary``
    says what was found in one line, ``detail`` why it matters, ``fix`` what to do."""

    check: str
    level: str
    summary: str
    detail: str = ""
    fix: str = ""

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level {self.level!r} is not one of {LEVELS}")


@dataclasses.dataclass
class Report:
    """Findings and facts (measured values: versions, cores, sizes) of one doctor run."""

    title: str
    findings: list[Finding] = dataclasses.field(default_factory=list)
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, findings: Iterable[Finding]) -> None:
        self.findings.extend(findings)

    def worst(self) -> str:
        return max((f.level for f in self.findings), key=LEVELS.index, default="ok")

    def exit_code(self) -> int:
        """0 clean (ok and info only), 1 warnings, 2 hazards."""
        worst = self.worst()
        return EXIT_HAZARDS if worst == "hazard" else EXIT_WARNINGS if worst == "warning" else 0

    def to_json(self) -> str:
        return json.dumps(
            {
                "title": self.title,
                "status": {0: "clean", 1: "warnings", 2: "hazards"}[self.exit_code()],
                "exit_code": self.exit_code(),
                "findings": [dataclasses.asdict(f) for f in self.findings],
                "facts": self.facts,
            },
            indent=2,
            default=str,
        )

    def to_text(self) -> str:
        lines = [self.title, ""]
        for f in sorted(self.findings, key=lambda f: -LEVELS.index(f.level)):
            lines.append(f"[{_MARKS[f.level]:>7}] {f.check}: {f.summary}")
            for label, text in (("why", f.detail), ("fix", f.fix)):
                if text:
                    lines.append(f"{'':10}{label}: {text}")
        counts = {level: sum(f.level == level for f in self.findings) for level in LEVELS}
        lines += [
            "",
            f"{counts['hazard']} hazard(s), {counts['warning']} warning(s), "
            f"{counts['info']} note(s), {counts['ok']} check(s) passed; exit status "
            f"{self.exit_code()} (0 clean, 1 warnings, 2 hazards)",
        ]
        return "\n".join(lines)
