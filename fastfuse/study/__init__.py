"""Probing studies: backbones x datasets x probe families x grids, resumable, local or on SLURM.

    python -m fastfuse study run STUDY.toml --out DIR     # or: study run DIR (continue)
    python -m fastfuse study status DIR
    python -m fastfuse study report DIR
    python -m fastfuse study demo --out DIR

    from fastfuse.study import load_study, prepare_study, run_cell, write_report
    spec = load_study("study.toml")
    for cell in spec.cells(): ...

Modules: spec (the study file, cells, configuration hashes), families (probe families known to
the sweep), units (the study folder and its completion records), cells (a cell's features and
sweeps), datasets / synthetic (the images), runner (setup, status), launchers (local, SLURM via
submitit), report (table, gain figure, heatmaps), demo, cli. See docs/studies.md.
"""
from .cells import run_cell
from .cli import add_arguments, run
from .demo import DEMO_STUDY, write_demo_study
from .families import known_families
from .launchers import SlurmOptions, job_script, launch_local, run_task, submit
from .report import write_report
from .runner import StudyChangedError, cell_status, cells_to_run, format_status, open_study, prepare_study
from .spec import Backbone, Cell, Dataset, StudyFileError, StudySpec, load_study, parse_study

__all__ = ["load_study", "parse_study", "StudySpec", "Backbone", "Dataset", "Cell", "StudyFileError",
           "prepare_study", "open_study", "cell_status", "cells_to_run", "format_status", "StudyChangedError",
           "run_cell", "run_task", "launch_local", "submit", "job_script", "SlurmOptions", "write_report",
           "known_families", "write_demo_study", "DEMO_STUDY", "add_arguments", "run"]
