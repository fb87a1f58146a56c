"""Run cases: build every implementation, warm it up (compiling, if it compiles), time all of
them interleaved, and turn the medians into records against the paper and the roofline."""
from __future__ import annotations

import dataclasses
import sys
import time

import torch
import torch.nn.functional as F

from . import peers
from .cases import Case
from .impls import build
from .memory import peak_mb_in_subprocess
from .roofline import Machine, measure_machine
from .timing import interleaved_median_ms

MODES = ("train", "infer")
RECORD_KEYS = ("impl", "case", "mode", "ms", "peak_mb", "speedup_vs_paper", "roofline_ms",
               "unavailable")


def make_inputs(case: Case, device: str, seed: int = 0):
    """The case's input (tokens, or the list of layer activations) and labels; no grad needed
    for the inputs: a probe trains on a frozen backbone's features."""
    generator = torch.Generator().manual_seed(seed)
    if case.layers:
        x = [torch.randn(case.batch, case.layer_tokens, case.dim, generator=generator).to(device)
             for _ in range(case.layers)]
    else:
        x = torch.randn(case.batch, case.num_tokens, case.dim, generator=generator).to(device)
    labels = torch.randint(0, case.classes, (case.batch,), generator=generator).to(device)
    return x, labels


def make_step(module: torch.nn.Module, x, labels, mode: str):
    """One training step (forward, loss, backward) or one inference call."""
    if mode == "train":
        module.train()

        def step():
            module.zero_grad(set_to_none=True)
            F.cross_entropy(module(x), labels).backward()
    else:
        module.eval()

        def step():
            with torch.no_grad():
                module(x)
    return step


def _why(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_case(case: Case, names: list[str], device: str, machine: Machine, *, modes=MODES,
             repeats: int = 5, budget_s: float | None = None) -> list[dict]:
    """Records for every (implementation, mode) of one case; failures become unavailable rows."""
    peers.reset_compiled()  # each case compiles for its own static shapes
    x, labels = make_inputs(case, device)
    modules, failed = {}, {}
    for name in names:
        try:
            modules[name] = build(name, case, device)
        except Exception as error:  # noqa: BLE001 - any failure makes the row unavailable
            failed[name] = _why(error)
    records = []
    for mode in modes:
        started = time.perf_counter()
        steps, mode_failed = {}, dict(failed)
        for name, module in modules.items():
            step = make_step(module, x, labels, mode)
            try:
                step()  # warm-up, and for torch.compile the compilation: never timed
            except Exception as error:  # noqa: BLE001
                mode_failed[name] = _why(error)
                continue
            steps[name] = step
        for name, reason in mode_failed.items():
            _log(f"# {name} unavailable for {case.name}/{mode}: {reason}")
        times = interleaved_median_ms(steps, device=device, warmup=0, repeats=repeats,
                                      budget_s=budget_s) if steps else {}
        floor = roofline_ms(case, mode, machine)
        for name in names:
            ms = times.get(name)
            paper = times.get("paper")
            records.append({"impl": name, "case": case.name, "mode": mode, "ms": ms, "peak_mb": None,
                            "speedup_vs_paper": paper / ms if paper and ms else None,
                            "roofline_ms": floor, "unavailable": mode_failed.get(name)})
        _log(f"# {case.name} {mode}: {len(steps)} implementations, "
             f"{time.perf_counter() - started:.0f} s")
    return records


def run_cases(cases, names: list[str], device: str, *, modes=MODES, repeats: int = 5,
              budget_s: float | None = None, memory_cases=(), quick: bool = False
              ) -> tuple[list[dict], Machine]:
    """Records of every case, the peak memory of the training rows of ``memory_cases``, and the
    machine's rates: the better of a measurement before and one after (a busy moment only
    ever lowers them), from which every record's roofline is computed."""
    machine = measure_machine(device, quick=quick)
    _log(f"# {device}: sgemm {machine.sgemm_gflops:.0f} GFLOP/s, streaming "
         f"{machine.bandwidth_gbs:.0f} GB/s, torch threads {torch.get_num_threads()}")
    records = []
    for case in cases:
        case_records = run_case(case, names, device, machine, modes=modes, repeats=repeats,
                                budget_s=budget_s)
        if case.name in memory_cases:
            add_peak_memory(case_records, case, device)
        records.extend(case_records)
    machine = machine.best(measure_machine(device, quick=quick))
    _log(f"# roofline rates (best of start and end): sgemm {machine.sgemm_gflops:.0f} GFLOP/s, "
         f"streaming {machine.bandwidth_gbs:.0f} GB/s")
    by_name = {case.name: case for case in cases}
    for record in records:
        record["roofline_ms"] = roofline_ms(by_name[record["case"]], record["mode"], machine)
    return records, machine


def roofline_ms(case: Case, mode: str, machine: Machine) -> float:
    """The floor of the case: folded FLOPs at the sgemm rate or its bytes at the bandwidth."""
    return machine.floor_ms(case.folded_flops(mode), case.floor_bytes(mode))


def add_peak_memory(records: list[dict], case: Case, device: str) -> None:
    """Fill peak_mb of the case's runnable training rows, one fresh process each."""
    for record in records:
        if record["case"] == case.name and record["mode"] == "train" and record["ms"] is not None:
            record["peak_mb"] = peak_mb_in_subprocess(record["impl"], dataclasses.asdict(case),
                                                      "train", device)


def peak_memory_child(impl: str, case_fields: dict, mode: str, device: str) -> float:
    """Entry point of the memory-measuring child process (see memory.py)."""
    from .memory import measure_step_mb

    case = Case(**case_fields)
    module = build(impl, case, device)
    x, labels = make_inputs(case, device)
    step = make_step(module, x, labels, mode)
    step()  # warm-up (compilation, thread pools, workspaces); its gradients are freed next step
    return measure_step_mb(step, device)
