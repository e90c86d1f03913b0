"""Was a test patient seen in training? The checkpoint's `train_patients` record against the test slides.

The checkpoint's `training_args.json` holds `train_patients` (docs/formats.md): patient ids, or
salted sha256 hashes of them with the salt. A test patient found there makes a score optimistic —
two slides of one patient share one report — so the report warns, and `--strict` refuses to run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Mapping

from ..patients import PatientMapError, patients_of, seen_in_training
from .criteria import EvalError

logger = logging.getLogger(__name__)

TRAINING_ARGS = "training_args.json"  # written by train/ beside every checkpoint (not imported: eval may not)


def check_training_patients(checkpoint: str | Path | None, slides: Iterable[str],
                            patient_map: Mapping[str, str] | None = None, strict: bool = False) -> dict:
    """`patients` of summary.json: how many test patients, whether the check could run, who was seen.

    With `strict`, a test patient seen in training, or a checkpoint that records no training patients,
    raises EvalError before anything is answered.
    """
    test_patients = sorted(patients_of(slides, patient_map))
    result = {"n_test_patients": len(test_patients), "checked": False, "n_seen": None, "seen": []}
    if checkpoint is None:
        return {**result, "reason": "no checkpoint (answers from another system)"}
    path = Path(checkpoint) / TRAINING_ARGS
    recorded = None
    if path.is_file():
        try:
            recorded = json.loads(path.read_text()).get("train_patients")
        except (ValueError, AttributeError) as e:
            raise EvalError(f"{path} is not a JSON object ({e}).") from e
    if recorded is None:
        reason = f"{path} records no train_patients"
        if strict:
            raise EvalError(f"--strict: {reason}, so test patients cannot be checked against training; retrain with "
                            "a version that records them, or run without --strict (the report then says so).")
        logger.warning("%s: leakage of test patients into training is not checked.", reason)
        return {**result, "reason": reason}
    try:
        seen = seen_in_training(test_patients, recorded, str(path))
    except PatientMapError as e:
        raise EvalError(str(e)) from e
    result.update(checked=True, n_seen=len(seen), seen=seen[:100],
                  recorded_as="salted hashes" if isinstance(recorded, dict) else "ids")
    if seen:
        message = (f"{len(seen)} of {len(test_patients)} test patients were seen in training (first: "
                   f"{', '.join(seen[:5])}); their scores are optimistic")
        if strict:
            raise EvalError(f"--strict: {message}. Remove them from the test data or use a checkpoint trained "
                            "without them.")
        logger.warning("%s.", message)
    return result


def patients_markdown(patients: dict | None) -> list[str]:
    """report.md lines about test/training patient overlap."""
    if not patients:
        return []
    if not patients.get("checked"):
        return [f"- patients: {patients['n_test_patients']} in the test set; **not checked against training** "
                f"({patients.get('reason', 'unknown')})"]
    if patients["n_seen"]:
        return [f"- **warning: {patients['n_seen']} of {patients['n_test_patients']} test patients were seen in "
                f"training** (first: {', '.join(patients['seen'][:5])}); their questions flatter the model"]
    return [f"- patients: {patients['n_test_patients']} in the test set, none seen in training "
            f"(checked against the checkpoint's {patients.get('recorded_as', 'record')})"]
