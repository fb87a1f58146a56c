"""The fused op alone in the gathering case, against one read of its inputs.

CLS + AP tokens of L layer activations (B, T, D) pooled against H score vectors, forward and
backward to the score vectors (frozen features: the probing case), timed beside the cheapest
thing that reads every input element once (a float32 sum of each layer). Issue 16 item 2's
target: within 1.5x of that read.

    python benchmarks/gather_speed.py [--backend cpu] [--layers 12] [--batch 32] [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastfuse


def median_ms(call, repeats: int, device: str) -> float:
    call()  # warm-up: thread pools, workspaces, kernel compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=197, help="rows per layer (CLS + patches)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    layers = [torch.randn(args.batch, args.tokens, args.dim, generator=generator).to(args.device, dtype)
              for _ in range(args.layers)]
    weight = (0.05 * torch.randn(args.heads, args.dim, generator=generator)).to(args.device).requires_grad_()

    def fused():
        weight.grad = None
        pooled, _ = fastfuse.attentive_pool(layers, weight, tokens="cls+ap", backend=args.backend)
        pooled.backward(torch.ones_like(pooled))

    def forward_only():
        with torch.no_grad():
            fastfuse.attentive_pool(layers, weight, tokens="cls+ap", backend=args.backend)

    def read_once():
        for layer in layers:
            layer.sum(dtype=torch.float32)

    results = {"read_once_ms": median_ms(read_once, args.repeats, args.device),
               "forward_ms": median_ms(forward_only, args.repeats, args.device),
               "forward_backward_ms": median_ms(fused, args.repeats, args.device)}
    results["forward_backward_over_read"] = results["forward_backward_ms"] / results["read_once_ms"]
    results["forward_over_read"] = results["forward_ms"] / results["read_once_ms"]
    results["shape"] = vars(args)
    results["torch_threads"] = torch.get_num_threads()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
