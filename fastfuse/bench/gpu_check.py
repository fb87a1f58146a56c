"""``bash scripts/gpu_check.sh [DIR]``: validate and measure the GPU kernels on one GPU, in one go.

Steps (each a subprocess with its own time limit, all meant to fit in about 8 minutes on one
H100-class GPU):

  tests        the whole suite on CUDA with FASTFUSE_REQUIRE_BACKENDS=torch,cuda,triton
  configs      the Triton tests once per autotune config, forced (FASTFUSE_TRITON_CONFIG=i),
               against the torch backend
  graphs       CUDA-graph capture of a training step per backend, with synchronising calls
               made errors (tests/test_gpu_graphs.py), and a layer of more than 2^31 elements
               (tests/test_gpu_large.py)
  traffic      the modelled traffic of the Triton and CUDA launches (bench --traffic)
  bench        ``python -m fastfuse bench --device cuda --gpu-shapes`` (the paper's shapes and
               issue 15's (a)(b)(c); roofline from the bandwidth measured in the same run)
  sweep        benchmarks/sweep_speed.py on CUDA: lockstep vs sequential vs the paper's probe

Everything lands in one directory (default gpu_check/<UTC time>): each step's output, the
bench and sweep JSON, results.json and a Markdown summary (README.md) that the project README
can quote. Without a CUDA GPU it writes nothing, says why, and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP_MESSAGE = "gpu_check: skipped: no CUDA GPU is visible"


def _steps(folder: Path, python: str) -> list[dict]:
    from ..kernels.triton.configs import config_tables

    configs = max(len(table) for table in config_tables().values())
    required = {"FASTFUSE_REQUIRE_BACKENDS": "torch,cuda,triton"}
    steps = [dict(name="tests", command=[python, "-m", "pytest", "tests", "-q", "-x", "-ra"],
                  env=required, limit_s=120)]
    steps += [dict(name=f"config {index}",
                   command=[python, "-m", "pytest", "tests/test_triton_backend.py", "-q", "-x",
                            "-k", "not every_config"],
                   env={**required, "FASTFUSE_TRITON_CONFIG": str(index)}, limit_s=20)
              for index in range(configs)]
    steps += [
        dict(name="graphs and int64", command=[python, "-m", "pytest", "tests/test_gpu_graphs.py",
                                               "tests/test_gpu_large.py", "-q", "-ra"], env=required, limit_s=40),
        dict(name="traffic", command=[python, "-m", "fastfuse", "bench", "--traffic"], env={}, limit_s=15),
        dict(name="bench", command=[python, "-m", "fastfuse", "bench", "--device", "cuda", "--gpu-shapes",
                                    "--no-memory", "--repeats", "3", "--json", str(folder / "bench.json")],
             env={}, limit_s=90),
        dict(name="sweep speed", command=[python, "benchmarks/sweep_speed.py", "--repeats", "1",
                                          "--out", str(folder / "sweep_speed.json")],
             env={"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}, limit_s=60),
    ]
    return steps


def run_step(step: dict, folder: Path) -> dict:
    from ..storage import write_text

    started = time.perf_counter()
    try:
        result = subprocess.run(step["command"], cwd=ROOT, env={**os.environ, **step["env"]},
                                capture_output=True, text=True, timeout=step["limit_s"])
        returncode, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        returncode = "timeout"
        output = (error.stdout or b"").decode(errors="replace") if isinstance(error.stdout, bytes) else (error.stdout or "")
    seconds = time.perf_counter() - started
    log = folder / (step["name"].replace(" ", "_") + ".log")
    write_text(log, output)
    return dict(name=step["name"], command=" ".join(step["command"]), env=step["env"],
                returncode=returncode, seconds=round(seconds, 1), log=log.name,
                tail=output.strip().splitlines()[-1] if output.strip() else "")


def summary_markdown(results: dict) -> str:
    """The Markdown summary of a run (``results`` as written to results.json)."""
    lines = [f"# GPU check: {results['device']}", "",
             f"{results['started']} · torch {results['torch']} · {results['total_seconds']:.0f} s in all", "",
             "| step | result | seconds | last line |", "|---|---|---:|---|"]
    for step in results["steps"]:
        status = "ok" if step["returncode"] == 0 else f"FAILED ({step['returncode']})"
        tail = step["tail"].replace("|", "\\|")
        lines.append(f"| {step['name']} | {status} | {step['seconds']:.1f} | {tail} |")
    bench = results.get("bench_rows") or []
    if bench:
        lines += ["", "## Kernel benchmark (bench.json)", "", "| case | impl | mode | ms | x roofline |",
                  "|---|---|---|---:|---:|"]
        for row in bench:
            lines.append(f"| {row['case']} | {row['impl']} | {row['mode']} | {row['ms']:.3f} | "
                         f"{row['vs_floor']:.2f} |")
    failed = [step["name"] for step in results["steps"] if step["returncode"] != 0]
    lines += ["", "All steps passed." if not failed else "Failed: " + ", ".join(failed) + "."]
    return "\n".join(lines) + "\n"


def _bench_rows(path: Path) -> list[dict]:
    """(case, impl, mode, ms, time / roofline) rows of a bench JSON, when it has them."""
    if not path.exists():
        return []
    payload = json.loads(path.read_text())
    rows = []
    for record in payload.get("records", []):
        if record.get("ms") is None:
            continue
        floor = record.get("roofline_ms") or 0.0
        rows.append(dict(case=record.get("case"), impl=record.get("impl"), mode=record.get("mode"),
                         ms=float(record["ms"]), vs_floor=float(record["ms"]) / floor if floor else float("nan")))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="output directory (default gpu_check/<UTC time>)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"{SKIP_MESSAGE} (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "run it on a machine with one to validate and measure the GPU kernels")
        return 0
    from ..storage import write_json, write_text

    started = datetime.datetime.now(datetime.timezone.utc)
    folder = Path(args.folder or ROOT / "gpu_check" / started.strftime("%Y%m%dT%H%M%SZ"))
    folder.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   started=started.isoformat(timespec="seconds"), steps=[])
    for step in _steps(folder, sys.executable):
        outcome = run_step(step, folder)
        print(f"{outcome['name']:18s} {'ok' if outcome['returncode'] == 0 else 'FAILED'} "
              f"{outcome['seconds']:6.1f} s  {outcome['tail']}", flush=True)
        results["steps"].append(outcome)
    results["total_seconds"] = time.perf_counter() - clock
    results["bench_rows"] = _bench_rows(folder / "bench.json")
    write_json(folder / "results.json", results)
    write_text(folder / "README.md", summary_markdown(results))
    print(f"wrote {folder}")
    return 0 if all(step["returncode"] == 0 for step in results["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
