"""Where a study's cells run: this process (or one worker process per local device), or a
SLURM job array through submitit. Every launcher calls the same :func:`run_task`."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

LAUNCHERS = ("local", "slurm")


def run_task(study_dir: str, cell_ids: Sequence[str], device: Optional[str] = None,
             progress: bool = True) -> dict:
    """Runs the given cells of the study folder one after another; {cell: done|failed|busy}.

    What a local worker, and each task of a SLURM job array, executes.
    """
    from .cells import run_cell
    from .runner import open_study

    spec = open_study(study_dir)
    return {cell_id: run_cell(spec, spec.cell(cell_id), study_dir, device=device, progress=progress)
            for cell_id in cell_ids}


def group_cells(cell_ids: Sequence[str], cells_per_task: int) -> list[list[str]]:
    if isinstance(cells_per_task, bool) or not isinstance(cells_per_task, int) or cells_per_task < 1:
        raise ValueError(f"cells_per_task must be a positive int, got {cells_per_task!r}")
    return [list(cell_ids[start:start + cells_per_task]) for start in range(0, len(cell_ids), cells_per_task)]


def local_devices(devices: Optional[str] = None) -> list[Optional[str]]:
    """'cuda:0,cuda:1' / 'cpu' as given; by default every visible GPU, else [None] (run_sweep's choice)."""
    if devices:
        return [item.strip() for item in devices.split(",") if item.strip()]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{index}" for index in range(count)] if count > 1 else [None]


def launch_local(study_dir, cell_ids: Sequence[str], *, devices: Optional[str] = None,
                 progress: bool = True) -> dict:
    """One device: the cells in this process, in order. Several: one worker process per device,
    the cells dealt round-robin. Returns {cell: done|pending|failed} as the study folder records them."""
    chosen = local_devices(devices)
    if len(chosen) == 1:
        return run_task(str(study_dir), list(cell_ids), device=chosen[0], progress=progress)
    shares = [list(cell_ids[index::len(chosen)]) for index in range(len(chosen))]
    workers = []
    for device, share in zip(chosen, shares):
        if not share:
            continue
        command = [sys.executable, "-m", "fastfuse.study.worker", str(study_dir), "--cells", ",".join(share)]
        if device:
            command += ["--device", device]
        if not progress:
            command.append("--no-progress")
        workers.append((share, subprocess.Popen(command, env=dict(os.environ))))
    for _share, process in workers:
        process.wait()
    from .runner import cell_status, open_study

    found = {status.cell: status.state for status in cell_status(open_study(study_dir), study_dir)}
    return {cell_id: found.get(cell_id, "failed") for cell_id in cell_ids}


@dataclasses.dataclass
class SlurmOptions:
    partition: Optional[str] = None
    gpus_per_task: int = 1
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    time_min: int = 240
    array_parallelism: int = 256
    job_name: str = "fastfuse-study"


def make_executor(study_dir, options: SlurmOptions, num_tasks: int, *, cluster: str = "slurm",
                  script_only: bool = False):
    """A submitit AutoExecutor for ``cluster`` ("slurm"; "local" runs the same tasks as local
    processes) with the study's resources; its jobs' logs go to DIR/slurm/."""
    import submitit

    folder = Path(study_dir) / "slurm" / "%j"
    if script_only:  # no srun on this machine: submitit's SlurmExecutor may still write the script
        with _srun_assumed(submitit.SlurmExecutor):
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    parameters = {"name": options.job_name, "timeout_min": options.time_min, "slurm_gpus_per_task": options.gpus_per_task,
                  "slurm_array_parallelism": min(options.array_parallelism, max(num_tasks, 1))}
    if options.cpus_per_task is not None:
        parameters["cpus_per_task"] = options.cpus_per_task
    if options.mem_gb is not None:
        parameters["mem_gb"] = options.mem_gb
    if options.partition:
        parameters["slurm_partition"] = options.partition
    executor.update_parameters(**parameters)
    return executor


def submit(study_dir, cell_ids: Sequence[str], options: SlurmOptions, *, cells_per_task: int = 1,
           cluster: str = "slurm", progress: bool = False) -> list:
    """One job array: a task per group of ``cells_per_task`` cells. Returns submitit's jobs."""
    groups = group_cells(list(cell_ids), cells_per_task)
    executor = make_executor(study_dir, options, len(groups), cluster=cluster)
    study = str(Path(study_dir).resolve())
    from .requeue import StudyTask

    return executor.map_array(StudyTask(), [study] * len(groups), groups, [None] * len(groups),
                              [progress] * len(groups))


def job_script(study_dir, cell_ids: Sequence[str], options: SlurmOptions, *, cells_per_task: int = 1) -> str:
    """The sbatch script ``submit`` would hand to SLURM (for --slurm-dry-run); submits nothing."""
    groups = group_cells(list(cell_ids), cells_per_task)
    executor = make_executor(study_dir, options, len(groups), script_only=True)
    slurm = executor._executor  # submitit's own SlurmExecutor writes the script, as on submission
    if len(groups) > 1:
        slurm.parameters["map_count"] = len(groups)  # what submitit sets for a job array
    return slurm._make_submission_file_text(slurm._submitit_command_str, "dry-run")


@contextlib.contextmanager
def _srun_assumed(slurm_executor_class):
    """submitit's SlurmExecutor refuses to start without srun; a dry run only writes its script."""
    original = slurm_executor_class.__dict__["affinity"]
    slurm_executor_class.affinity = classmethod(lambda cls: 2)
    try:
        yield
    finally:
        slurm_executor_class.affinity = original
