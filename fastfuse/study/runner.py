"""Setting a study folder up, checking it against the study file, and what is left to do."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from ..storage import FolderLock, write_text
from . import units
from .cells import cell_units
from .spec import StudySpec, load_study, parse_study


class StudyChangedError(RuntimeError):
    """Units of the study were computed with another configuration than the study file gives now."""


@dataclasses.dataclass
class CellStatus:
    cell: str
    state: str                   # "done", "pending" or "failed"
    units: dict                  # unit -> "done" | "pending" | "changed"
    error: Optional[str] = None


def open_study(study_dir) -> StudySpec:
    """The study of an existing study folder (its copied study.toml)."""
    path = Path(study_dir) / units.STUDY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{study_dir} is not a study folder (no {units.STUDY_FILE}); start one with "
                                "`python -m fastfuse study run STUDY.toml --out DIR`")
    return load_study(path)


def prepare_study(source, out=None, *, force: bool = False) -> tuple[StudySpec, Path]:
    """(spec, study folder) for ``run``: ``source`` is a study file (with ``out``) or a study folder.

    A study file is copied into the folder (with a ``root`` line, so its relative paths keep
    pointing where they did). If units already done there were computed with another
    configuration, StudyChangedError lists them, unless ``force`` (they are then redone).
    """
    source = Path(source)
    if source.is_dir():
        if out is not None and Path(out).resolve() != source.resolve():
            raise ValueError(f"study run {source}: a study folder continues in place; drop --out {out}")
        return open_study(source), source
    if out is None:
        raise ValueError("study run STUDY.toml needs --out DIR (the study folder)")
    study_dir = Path(out)
    spec = load_study(source)
    with FolderLock(study_dir, purpose="study setup"):
        changed = [f"{cell.id}: {unit}" for cell in spec.cells() for unit, config_hash in cell_units(spec, cell)
                   if units.unit_state(study_dir, cell.id, unit, config_hash) == "changed"]
        if changed and not force:
            raise StudyChangedError(
                f"{study_dir} holds results of another configuration for {len(changed)} unit(s) "
                f"({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''}); pass --force to redo them "
                "with the new study file, or use another --out")
        text = spec.source
        if not text.lstrip().startswith("root ="):
            text = (f"# copied by `fastfuse study run` from {source.resolve()}\n"
                    f"root = {json.dumps(str(source.resolve().parent))}\n" + text)
        parse_study(text, where=str(source))  # the copy must read back as the same study
        write_text(study_dir / units.STUDY_FILE, text)
    return spec, study_dir


def cell_status(spec: StudySpec, study_dir) -> list[CellStatus]:
    statuses = []
    for cell in spec.cells():
        states = {unit: units.unit_state(study_dir, cell.id, unit, config_hash)
                  for unit, config_hash in cell_units(spec, cell)}
        failure = units.read_failure(study_dir, cell.id)
        if all(state == "done" for state in states.values()):
            state = "done"
        elif failure is not None:
            state = "failed"
        else:
            state = "pending"
        statuses.append(CellStatus(cell.id, state, states, failure.get("error") if failure and state == "failed" else None))
    return statuses


def cells_to_run(spec: StudySpec, study_dir, *, retry_failed: bool = False) -> list[str]:
    """Cells with units left, in study order; failed cells only with ``retry_failed``."""
    return [status.cell for status in cell_status(spec, study_dir)
            if status.state == "pending" or (status.state == "failed" and retry_failed)]


def format_status(spec: StudySpec, study_dir) -> str:
    statuses = cell_status(spec, study_dir)
    width = max(len(status.cell) for status in statuses)
    lines = [f"study {spec.name!r} in {study_dir}: {len(statuses)} cell(s)"]
    for status in statuses:
        detail = ", ".join(f"{unit} {state}" for unit, state in status.units.items())
        lines.append(f"  {status.cell:<{width}}  {status.state:<8} {detail}")
        if status.error:
            lines.append(f"  {'':<{width}}  error: {status.error} "
                         f"(traceback: {units.failure_path(study_dir, status.cell)})")
    counts = {state: sum(status.state == state for status in statuses) for state in ("done", "pending", "failed")}
    lines.append(", ".join(f"{count} {state}" for state, count in counts.items()))
    return "\n".join(lines)
