"""run_sweep: a grid (and optionally the weight-decay search) trained, chosen on val, written out.

With ``out``, the folder is locked for the run (a second run on it is refused, naming the
holder), a non-empty folder needs ``resume`` or ``overwrite``, and every lockstep group keeps a
checkpoint per epoch in OUT/checkpoints/ until the results are written: ``resume`` continues a
killed sweep from the last completed epoch of every group, with the results an uninterrupted
run gives. OUT/sweep.json records what the sweep is; a resume of another sweep is refused.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Union

from .. import storage
from . import distributed, results as results_io
from .data import SweepData, load_sweep_data
from .grid import SweepGrid, next_search_round
from .train import ATTENTIVE, TrainSettings, train_group


SWEEP_RECORD = "sweep.json"
CHECKPOINTS = "checkpoints"


class SweepOutputError(ValueError):
    """--out cannot take this sweep (not empty without resume/overwrite, or another sweep's)."""


def _group_checkpoint(out: Optional[Path], group) -> Optional[Path]:
    if out is None:
        return None
    first, last = group[0], group[-1]
    return out / CHECKPOINTS / f"round{first.round}-probes{first.index}-{last.index}.pt"


def _prepare_out(out: Path, identity: dict, *, resume: bool, overwrite: bool) -> Optional[dict]:
    """Checks and clears ``out`` (locked by the caller); returns finished results to reuse, if any."""
    storage.remove_temporaries(out)
    entries = storage.folder_entries(out)
    if overwrite:
        for name in results_io.OUTPUTS + (SWEEP_RECORD,):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    elif entries and not resume:
        raise SweepOutputError(f"--out {out} is not empty ({', '.join(entry.name for entry in entries[:5])}"
                               f"{', ...' if len(entries) > 5 else ''}); pass --resume to continue the sweep "
                               "written there, or --overwrite to replace its results")
    elif resume and entries:
        record = out / SWEEP_RECORD
        if not record.exists():
            raise SweepOutputError(f"--resume: {out} holds no {SWEEP_RECORD}, so what it holds was not written "
                                   "by a resumable sweep; use --overwrite or another --out")
        previous = storage.read_json(record, what="sweep record")
        if previous != identity:
            keys = sorted(key for key in set(previous) | set(identity) if previous.get(key) != identity.get(key))
            raise SweepOutputError(f"--resume: {out} holds another sweep (it differs in {', '.join(keys)}); "
                                   "use --overwrite or another --out")
        if (out / results_io.RESULTS_JSON).exists():
            return results_io.read_results(out)
    storage.write_json(out / SWEEP_RECORD, identity)
    return None


def _train_round(data: SweepData, configs, settings: TrainSettings, context, *, sequential: bool,
                 progress: bool, round_index: int, out: Optional[Path] = None):
    """Train this rank's share of ``configs``; return every rank's rows and this rank's snapshots."""
    local = distributed.shard(configs, context)
    groups = [[config] for config in local] if sequential else ([local] if local else [])
    rows, snapshots, probe_kwargs = {}, {}, None
    for group in groups:
        if sequential:
            config = group[0]
            desc = f"round {round_index} probe {config.index} (lr={config.lr:g} wd={config.wd:g} seed={config.seed})"
        else:
            desc = f"round {round_index}: {len(group)} probes in lockstep"
        result = train_group(data, group, settings, progress=progress and context.is_main, desc=desc,
                             checkpoint=_group_checkpoint(out, group))
        for name, model_rows in result.rows.items():
            rows.setdefault(name, []).extend(model_rows)
        snapshots.update(result.snapshots)
        probe_kwargs = result.probe_kwargs
    merged = {}
    for rank_rows in distributed.all_gather(rows, context):
        for name, model_rows in rank_rows.items():
            merged.setdefault(name, []).extend(model_rows)
    for model_rows in merged.values():
        model_rows.sort(key=lambda row: row["index"])
    return merged, snapshots, probe_kwargs


def _keep_best_seed_snapshots(snapshots: dict, rows) -> dict:
    """Per (lr, wd), only the best seed's weights can become the checkpoint; drop the others."""
    best = {}
    for row in sorted(rows, key=lambda row: row["index"]):
        if row["index"] not in snapshots or row.get("diverged"):
            continue
        key = (row["lr"], row["wd"])
        if key not in best or row["best_val_acc"] > best[key]["best_val_acc"]:
            best[key] = row
    return {row["index"]: snapshots[row["index"]] for row in best.values()}


def run_sweep(features: Union[str, Path, SweepData], grid: Union[SweepGrid, Mapping], *,
              num_heads: int = 12, head_dim: Optional[int] = None, qkv_bias: bool = False,
              epochs: int = 10, batch_size: int = 256, warmup_epochs: float = 1.0, data_seed: int = 0,
              sequential: bool = False, wd_search: bool = False, wd_search_rounds: int = 4,
              wd_search_min_step: float = 0.1, backend: Optional[str] = None, device: Optional[str] = None,
              baselines: bool = True, eval_batch_size: int = 1024, fused_adamw: bool = True,
              probes_per_call: Optional[int] = None, probe: str = "attentive-fusion",
              out: Union[str, Path, None] = None, resume: bool = False, overwrite: bool = False,
              nonfinite: str = "raise",
              progress: bool = True, plots: bool = True, verbose: bool = False) -> dict:
    """Train every probe of ``grid`` on cached features, in lockstep; choose the best on val.

    Args:
        features: a feature-cache directory (train/val/test splits, see ``fastfuse.features``)
            or a :class:`~fastfuse.sweep.data.SweepData`.
        grid: a :class:`SweepGrid` or ``{"lr": [...], "wd": [...], "seed": [...]}``.
        num_heads, head_dim, qkv_bias: the AttentiveFusion probes' shape.
        epochs, batch_size, warmup_epochs: training (AdamW, cosine schedule after a linear warmup).
        data_seed: the minibatch order, shared by every probe.
        sequential: train one probe at a time (same code path, P=1) instead of all together.
        wd_search: after the grid, refine the weight decay around the best (the paper's search),
            at most ``wd_search_rounds`` more rounds, until the step is below
            ``wd_search_min_step`` decades; every round is trained in lockstep.
        backend: fused-op backend (see ``fastfuse.attentive_pool``).
        device: where probes train; default the local GPU if any, else the CPU.
        baselines: also train the linear probes (last-layer CLS; all layers' tokens concatenated).
        fused_adamw: torch's fused AdamW kernel per probe (else the default AdamW's operations);
            both reproduce torch.optim.AdamW exactly (see ``fastfuse.sweep.optim``).
        probes_per_call: probes scored per fused-op call; None (default) scores all P*H keys
            of a lockstep group in one pass over each minibatch. Smaller chunks keep the
            working set in cache (on CPU, measure); results are the same.
        probe: the probe family: "attentive-fusion" (the paper's, default) or one of
            ``fastfuse.sweep.families.FAMILIES`` ("timm-map", "vjepa", "aim", "ep").
        out: directory for results.json / results.csv / attention.png / best_probe.pt (rank 0),
            locked for the run; per-epoch checkpoints live in OUT/checkpoints until the end.
        resume: continue the sweep written in ``out`` (refused when ``out`` holds another sweep);
            a finished one is returned as it is.
        overwrite: remove the previous sweep's files from ``out`` first. Without either, a
            non-empty ``out`` is refused (SweepOutputError).
        nonfinite: samples holding NaN/infinity: 'raise' (default; names the split and samples),
            'drop' them, or 'keep' (unchecked).
        progress: tqdm bars on stderr; verbose: print the table (rank 0).

    Under torchrun the grid is split across ranks and every rank returns the full results.
    """
    grid = SweepGrid.coerce(grid)
    if wd_search and any(wd <= 0 for wd in grid.wd):
        raise ValueError("the weight-decay search refines on a log scale: wd values must be > 0, "
                         f"got {list(grid.wd)}")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise SweepOutputError(f"--out {out} exists and is not a directory")
    context = distributed.setup(device)
    lock = None
    try:
        start = time.perf_counter()
        data = features if isinstance(features, SweepData) else load_sweep_data(features, nonfinite=nonfinite)
        settings = TrainSettings(num_heads=num_heads, head_dim=head_dim, qkv_bias=qkv_bias, epochs=epochs,
                                 batch_size=batch_size, warmup_epochs=warmup_epochs, data_seed=data_seed,
                                 backend=backend, device=context.device, baselines=baselines,
                                 eval_batch_size=eval_batch_size, fused_adamw=fused_adamw,
                                 probes_per_call=probes_per_call, probe=probe)
        problem, finished = None, None
        if out is not None and context.is_main:  # rank 0 holds the lock and decides
            identity = results_io.strict({
                "grid": {"lr": list(grid.lr), "wd": list(grid.wd), "seed": list(grid.seed)},
                "settings": {key: value for key, value in settings.as_dict().items()
                             if key not in ("device", "backend")},
                "mode": "sequential" if sequential else "lockstep", "world_size": context.world_size,
                "wd_search": [wd_search_rounds, wd_search_min_step] if wd_search else None,
                "features": {"directory": data.directory, "meta": data.meta, "nonfinite": nonfinite,
                             "samples": {name: len(split) for name, split in data.splits.items()}}})
            try:
                lock = storage.FolderLock(out, purpose="fastfuse sweep").acquire()
                finished = _prepare_out(out, identity, resume=resume, overwrite=overwrite)
            except (storage.FolderLockedError, ValueError) as error:
                problem = error
        # Every rank learns rank 0's outcome (a collective call, so every rank makes it).
        message, finished = distributed.all_gather(
            (str(problem) if problem is not None else None, finished), context)[0]
        if message is not None:
            raise problem if problem is not None else SweepOutputError(message)
        if finished is not None:
            if context.is_main and verbose:
                print(f"{out}: this sweep is already complete", file=sys.stderr)
                print(results_io.format_table(finished), file=sys.stdout, flush=True)
            return finished
        rows, snapshots, probe_kwargs = {}, {}, None
        configs, round_index, search_rounds = grid.configs(), 0, []
        while configs:
            round_rows, round_snapshots, round_kwargs = _train_round(
                data, configs, settings, context, sequential=sequential, progress=progress,
                round_index=round_index, out=out)
            for name, model_rows in round_rows.items():
                rows.setdefault(name, []).extend(model_rows)
            snapshots = _keep_best_seed_snapshots({**snapshots, **round_snapshots}, rows[ATTENTIVE])
            probe_kwargs = probe_kwargs or round_kwargs
            if round_index > 0:
                search_rounds.append(sorted({config.wd for config in configs}))
            if not wd_search or round_index >= wd_search_rounds:
                break
            round_index += 1
            configs = next_search_round(rows[ATTENTIVE], grid.seed, round_index, wd_search_min_step)
        # A rank left without configs still needs the probes' shape for the results.
        kwargs_all = distributed.all_gather(probe_kwargs, context)
        probe_kwargs = next(kwargs for kwargs in kwargs_all if kwargs is not None)
        meta = dict(data.meta, dim=data.dim, num_tokens=data.num_tokens, directory=data.directory,
                    tokens=data.layout.tokens)
        timing = {"mode": "sequential" if sequential else "lockstep", "world_size": context.world_size,
                  "seconds": time.perf_counter() - start}
        search = ({"rounds": search_rounds, "min_step_decades": wd_search_min_step, "max_rounds": wd_search_rounds}
                  if wd_search else None)
        results = results_io.assemble(
            rows, probe_kwargs=probe_kwargs, settings=settings.as_dict(),
            grid={"lr": list(grid.lr), "wd": list(grid.wd), "seed": list(grid.seed), "data_seed": data_seed},
            meta=meta, token_names=data.layout.token_names(), timing=timing, wd_search=search)
        best_index = results["best"]["probe_index"] if results["best"] is not None else None
        checkpoints = distributed.gather_to_main(snapshots.get(best_index), context)
        if context.is_main:
            checkpoint = next((state for state in checkpoints if state is not None), None)
            if out is not None:
                paths = results_io.write(results, out, checkpoint=checkpoint, plots=plots)
                results["files"] = {kind: str(path) for kind, path in paths.items()}
                shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the results are complete
            if verbose:
                print(results_io.format_table(results), file=sys.stdout, flush=True)
        distributed.barrier(context)
        return results
    finally:
        if lock is not None:
            lock.release()
        distributed.teardown(context)
