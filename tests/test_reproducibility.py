"""CPU results are bitwise reproducible, and two threads can share one module."""
import copy
import threading

import pytest
import torch

from helpers import cpu_backend_available, grads_of, make_probe


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_training_step_is_bitwise_reproducible(backend):
    if backend == "cpu" and not cpu_backend_available()[0]:
        pytest.skip(f"cpu backend unavailable: {cpu_backend_available()[1]}")
    # Big enough that the compiled kernels split the batch over two OpenMP threads.
    initial = make_probe(backend, "cpu", dim=64, heads=4, classes=5).train()
    generator = torch.Generator().manual_seed(4)
    layers = [torch.randn(48, t, 64, generator=generator) for t in (40, 25)]
    labels = torch.randint(0, 5, (48,), generator=generator)

    def step():
        probe = copy.deepcopy(initial)
        optimizer = torch.optim.SGD(probe.parameters(), lr=0.1, momentum=0.9)
        inputs = [layer.clone().requires_grad_() for layer in layers]
        logits, attention = probe(inputs, tokens="all", return_attention=True)
        loss = torch.nn.functional.cross_entropy(logits, labels) + attention.square().mean()
        loss.backward()
        grads = [p.grad.clone() for p in probe.parameters()] + [x.grad for x in inputs]
        optimizer.step()
        return [logits, attention] + grads + [p.detach() for p in probe.parameters()] + \
            [probe.bn.running_mean, probe.bn.running_var]

    first, second = step(), step()
    for index, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"tensor {index} differs between two identical training steps"


@pytest.mark.parametrize("with_grad", [False, True], ids=["no_grad", "grad"])
def test_two_threads_share_one_module(backend_device, with_grad):
    backend, device = backend_device
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter is not thread-safe (it patches triton.language while "
                    "a kernel runs: 'Did you forget to add @triton.jit ?'); GPU launches are")
    probe = make_probe(backend, device, dim=24, heads=3).eval()
    generator = torch.Generator().manual_seed(5)
    inputs = [[torch.randn(6, t, 24, generator=generator).to(device) for t in (7, 5)] for _ in range(2)]
    rounds = 6

    def compute(layers):
        if not with_grad:
            with torch.no_grad():
                return [probe(layers, tokens="cls+ap")]
        layers = [layer.clone().requires_grad_() for layer in layers]
        logits = probe(layers, tokens="cls+ap")
        return [logits.detach(), *grads_of(logits, layers, probe)]

    expected = [compute(layers) for layers in inputs]
    results, errors = [[], []], []
    barrier = threading.Barrier(2)

    def worker(index):
        try:
            barrier.wait(timeout=60)
            for _ in range(rounds):
                results[index].append(compute(inputs[index]))
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a worker thread hung"
    assert not errors, errors
    for index in range(2):
        assert len(results[index]) == rounds
        for result in results[index]:
            for got, want in zip(result, expected[index]):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
