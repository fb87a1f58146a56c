"""`import fastfuse` stays light: no torch._dynamo (torch.compile's frontend, ~2 s to import),
and none of the optional packages that only some commands need."""
import json

from helpers import run_python

HEAVY = ("torch._dynamo", "torch._inductor", "triton", "timm", "torchvision", "matplotlib", "hypothesis")


def test_import_loads_no_dynamo_and_no_optional_package():
    code = ("import json, sys, fastfuse\n"
            f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n")
    result = run_python(code, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
