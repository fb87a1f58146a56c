"""The function a SLURM array task runs, as a submitit Checkpointable: when SLURM preempts the
task or its time limit approaches, submitit requeues the same call, which skips the units that
finished and redoes the one that was cut (see units.py)."""
from __future__ import annotations

from typing import Optional, Sequence

import submitit

from .launchers import run_task


class StudyTask(submitit.helpers.Checkpointable):
    def __call__(self, study_dir: str, cell_ids: Sequence[str], device: Optional[str] = None,
                 progress: bool = False) -> dict:
        return run_task(study_dir, cell_ids, device=device, progress=progress)
