"""The study folder: where each cell's units live, and the records that say they are complete.

    DIR/study.toml                              the study file (copied by ``run``)
    DIR/cells/CELL/features/                    the cell's feature cache (fastfuse.features)
    DIR/cells/CELL/features.unit.json           {"unit", "config_hash", "seconds", "finished", ...}
    DIR/cells/CELL/sweeps/FAMILY/               the family's sweep (results.json, attention.png, ...)
    DIR/cells/CELL/sweeps/FAMILY.unit.json      its record
    DIR/cells/CELL/failed.json                  the traceback of the cell's last failure
    DIR/report/                                 ``study report``

A unit is complete exactly when its record exists (written atomically, last) and holds the
configuration hash the study file gives it now. Everything a unit writes sits in its own folder
and is rewritten from scratch when the unit is redone.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ..storage import read_json, write_json

STUDY_FILE = "study.toml"


def cell_dir(study_dir, cell_id: str) -> Path:
    return Path(study_dir) / "cells" / cell_id


def unit_record_path(study_dir, cell_id: str, unit: str) -> Path:
    """``unit`` is "features" or "sweeps/FAMILY"."""
    return cell_dir(study_dir, cell_id) / f"{unit}.unit.json"


def unit_dir(study_dir, cell_id: str, unit: str) -> Path:
    return cell_dir(study_dir, cell_id) / unit


def failure_path(study_dir, cell_id: str) -> Path:
    return cell_dir(study_dir, cell_id) / "failed.json"


def read_record(study_dir, cell_id: str, unit: str) -> Optional[dict]:
    path = unit_record_path(study_dir, cell_id, unit)
    if not path.exists():
        return None
    try:
        return read_json(path, what="unit record")
    except ValueError:
        return None  # unreadable: the unit counts as not done and is redone


def unit_state(study_dir, cell_id: str, unit: str, config_hash: str) -> str:
    """'done' (record with this hash), 'changed' (record with another hash) or 'pending'."""
    record = read_record(study_dir, cell_id, unit)
    if record is None:
        return "pending"
    return "done" if record.get("config_hash") == config_hash else "changed"


def write_record(study_dir, cell_id: str, unit: str, config_hash: str, **facts) -> dict:
    record = {"unit": unit, "cell": cell_id, "config_hash": config_hash,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **facts}
    write_json(unit_record_path(study_dir, cell_id, unit), record)
    return record


def remove_record(study_dir, cell_id: str, unit: str) -> None:
    unit_record_path(study_dir, cell_id, unit).unlink(missing_ok=True)


def read_failure(study_dir, cell_id: str) -> Optional[dict]:
    path = failure_path(study_dir, cell_id)
    if not path.exists():
        return None
    try:
        return read_json(path, what="failure record")
    except ValueError:
        return {"error": "unreadable failure record", "traceback": ""}
