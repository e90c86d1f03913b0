"""The judging criteria (`criteria.yaml`, or the user's own file) and the acceptance rule.

An answer is accepted when its criterion verdicts satisfy the rule: every criterion (`all`), every
major criterion (`major`, the default), or at least k criteria (`at-least:K`). A verdict the judge
could not give (null) is never counted as a pass or a fail: it leaves acceptance undecided only
while it could still tip the rule (one known major fail already rejects; six passes meet at-least:6).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path


from ..errors import ChatEXAONEPathError
from ..fileio import read_yaml

SEVERITIES = ("major", "minor")


class EvalError(ChatEXAONEPathError):
    """Evaluation input (test data, answers, criteria, run folder) is missing or malformed."""


@dataclass(frozen=True)
class Criterion:
    """One thing the judge checks: `id` is the JSON key it answers under."""

    id: str
    name: str
    definition: str
    severity: str = "major"


@dataclass(frozen=True)
class CriteriaSet:
    """The criteria of a run, in order, and the one a failed deterministic pre-check fails."""

    criteria: tuple[Criterion, ...]
    precheck_criterion: str | None = None
    source: str = "default"

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.criteria]

    def __getitem__(self, criterion_id: str) -> Criterion:
        return next(c for c in self.criteria if c.id == criterion_id)

    def as_dict(self) -> dict:
        """JSON-ready form, saved beside every run."""
        return {"source": self.source, "precheck_criterion": self.precheck_criterion,
                "criteria": [asdict(c) for c in self.criteria]}

    def fingerprint(self) -> str:
        """Changes when anything the judge reads changes (ids, definitions, severities)."""
        content = json.dumps({k: v for k, v in self.as_dict().items() if k != "source"}, sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()[:16]


def load_criteria(path: str | Path | None = None) -> CriteriaSet:
    """The criteria in `path`, or the seven shipped in `criteria.yaml`; malformed files raise EvalError."""
    where = str(path) if path is not None else "criteria.yaml"
    raw = read_yaml(path, __package__, "criteria.yaml", "Criteria file", EvalError)
    items = raw.get("criteria") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not items:
        raise EvalError(f"{where} needs a non-empty 'criteria' list of {{id, name, definition, severity}}.")
    criteria = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip()
                                                 for k in ("id", "definition")):
            raise EvalError(f"Criterion {i + 1} of {where} needs a non-empty 'id' and 'definition'.")
        severity = str(item.get("severity", "major"))
        if severity not in SEVERITIES:
            raise EvalError(f"Criterion {item['id']!r} of {where} has severity {severity!r}; use major or minor.")
        if not item["id"].replace("_", "").replace("-", "").isalnum():
            raise EvalError(f"Criterion id {item['id']!r} in {where} must be letters, digits, '_' or '-'.")
        criteria.append(Criterion(item["id"].strip(), str(item.get("name") or item["id"]).strip(),
                                  " ".join(item["definition"].split()), severity))
    ids = [c.id for c in criteria]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise EvalError(f"{where} defines the criterion id(s) {', '.join(duplicates)} more than once.")
    precheck = raw.get("precheck_criterion")
    if precheck is not None and precheck not in ids:
        raise EvalError(f"precheck_criterion {precheck!r} in {where} is not one of its criteria ({', '.join(ids)}).")
    return CriteriaSet(tuple(criteria), precheck, "default" if path is None else str(path))


@dataclass(frozen=True)
class AcceptanceRule:
    """When an answer counts as accepted: `all` criteria, all `major` ones, or `at-least` k."""

    mode: str = "major"
    k: int | None = None

    def __str__(self) -> str:
        return f"at-least:{self.k}" if self.mode == "at-least" else self.mode

    @classmethod
    def parse(cls, text: str, criteria: CriteriaSet | None = None) -> "AcceptanceRule":
        """`all`, `major` or `at-least:K` (K between 1 and the number of criteria)."""
        text = text.strip().lower()
        if text in ("all", "major"):
            return cls(text)
        mode, _, k = text.partition(":")
        if mode != "at-least" or not k.isdigit() or int(k) < 1:
            raise EvalError(f"Unknown acceptance rule {text!r}; use all, major or at-least:K (e.g. at-least:6).")
        if criteria is not None and int(k) > len(criteria.criteria):
            raise EvalError(f"at-least:{k} asks for more criteria than the {len(criteria.criteria)} defined.")
        return cls("at-least", int(k))

    def decide(self, passes: dict[str, bool | None], criteria: CriteriaSet) -> bool | None:
        """True/False as soon as the known verdicts settle the rule; None while a missing one could tip it."""
        needed = [c.id for c in criteria.criteria if self.mode != "major" or c.severity == "major"]
        known = [passes.get(i) for i in needed]
        n_pass, n_unknown = sum(v is True for v in known), sum(v is None for v in known)
        # Deciding while an unknown verdict could still tip the answer would bias the rate towards fails;
        # waiting once it no longer can would drop decided answers from the rate.
        k = int(self.k or 0) if self.mode == "at-least" else len(needed)
        if n_pass >= k:
            return True
        if n_pass + n_unknown < k:
            return False
        return None
