"""A missing, disabled, broken or stale compiled extension: reported in words, never fatal, and
the pure-PyTorch backend takes over with one warning."""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from helpers import PACKAGE_DIR, run_python


_FALLBACK_SCRIPT = textwrap.dedent("""
    import copy, sys, warnings, torch
    import fastfuse
    package_dir, expected = sys.argv[1], sys.argv[2]
    assert fastfuse.__file__.startswith(package_dir), fastfuse.__file__
    report = fastfuse.backends()
    assert report["torch"]["available"], report
    for name in ("cpu", "cuda"):
        entry = report.get(name)
        if entry is not None:
            assert not entry["available"] and expected in entry["reason"], (name, entry)
    probe = fastfuse.AttentiveFusion(8, 2, 3).eval()
    x = torch.randn(4, 5, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [probe(x) for _ in range(3)]
        layers = [torch.randn(4, 6, 8, requires_grad=True)]
        copy.deepcopy(probe).train()(layers, tokens="cls+ap").sum().backward()
    messages = [str(w.message) for w in caught if "fastfuse" in str(w.message)]
    assert len(messages) == 1 and "pure-PyTorch" in messages[0] and expected in messages[0], messages
    probe.backend = "torch"
    assert all(torch.equal(out, probe(x)) for out in outputs)
    try:
        fastfuse.AttentiveFusion(8, 2, 3, backend="cpu")(x)
    except RuntimeError as error:
        assert expected in str(error), error
    else:
        raise SystemExit("the explicit cpu backend did not raise")
    print("ok")
""")


def _copy_package(destination: Path, library_text=None, edit_schema=False) -> Path:
    """A copy of the package without its compiled library, or with a corrupt one."""
    target = destination / "fastfuse"
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "_C*.so"))
    if library_text is not None:
        (target / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))).write_text(library_text)
    if edit_schema:  # the Python schema moved on, the library was not rebuilt
        library = next(PACKAGE_DIR.glob("_C*.so"))
        shutil.copy2(library, target / library.name)
        schemas = target / "backends" / "compiled_ops.py"
        text = schemas.read_text()
        assert "int num_prefix_tokens, float eps, " in text
        schemas.write_text(text.replace("int num_prefix_tokens, float eps, ",
                                        "int num_prefix_tokens, float eps, bool extra, "))
    return destination


FALLBACK_CASES = {
    # name: (how to prepare, the words the report must contain)
    "disabled": ("FASTFUSE_NO_EXTENSION=1", "FASTFUSE_NO_EXTENSION"),
    "missing": ("no _C*.so in the package", "not built"),
    "broken": ("a text file named _C*.so", "failed"),
}


@pytest.fixture(scope="module")
def fallback_runs(tmp_path_factory):
    """Start every fallback case at once (each is a fresh interpreter importing torch)."""
    processes = {}
    for name in FALLBACK_CASES:
        env = {"FASTFUSE_BACKEND": ""}
        if name == "disabled":
            root = PACKAGE_DIR.parent
            env["FASTFUSE_NO_EXTENSION"] = "1"
        else:
            root = _copy_package(tmp_path_factory.mktemp(name),
                                 library_text="not a shared library\n" if name == "broken" else None)
            env["FASTFUSE_NO_EXTENSION"] = ""
        env["PYTHONPATH"] = str(root)
        processes[name] = subprocess.Popen(
            [sys.executable, "-c", _FALLBACK_SCRIPT, str(root), FALLBACK_CASES[name][1]],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
            env={**os.environ, **env})
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_extension_fallback(fallback_runs, case):
    stdout, stderr = fallback_runs[case].communicate(timeout=300)
    assert fallback_runs[case].returncode == 0 and "ok" in stdout, stderr[-3000:]


def test_stale_extension_is_reported_not_fatal(tmp_path):
    """A library built before a schema change would abort the process when loaded (the C++
    registration throws inside dlopen); the loader's schema hash refuses it with a reason."""
    if next(PACKAGE_DIR.glob("_C*.so"), None) is None:
        pytest.skip("no compiled library to make stale")
    root = _copy_package(tmp_path, edit_schema=True)
    code = ("import sys, fastfuse; entry = fastfuse.backends()['cpu']; "
            "assert not entry['available'], entry; print(entry['reason'])")
    result = run_python(code, env={"PYTHONPATH": str(root), "FASTFUSE_NO_EXTENSION": ""}, cwd=root)
    assert result.returncode == 0, f"rc {result.returncode}: {result.stderr[-1500:]}"
    assert "built against other op schemas" in result.stdout
