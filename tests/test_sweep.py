"""Sweeps (issue 6): stacked probes, per-probe AdamW, lockstep == sequential == distributed, outputs."""
import csv
import json
import math
import socket

import pytest
import torch

import fastfuse
from fastfuse.features import save_features
from fastfuse.paper import PaperAttentiveProbe
from fastfuse.sweep import (SweepGrid, StackedAdamW, StackedAttentiveFusion, StackedLinearProbe,
                            build_probe, cosine_with_warmup, load_best_probe, run_sweep)
from fastfuse.sweep.data import balanced_accuracy, batch_indices, load_sweep_data, steps_per_epoch
from fastfuse.sweep.grid import refine_weight_decays
from fastfuse.sweep.stacked import BUFFERS, PARAMETERS

NUM_SAMPLES, NUM_TOKENS, DIM, NUM_CLASSES = 96, 6, 16, 3
GRID = {"lr": [1e-3, 1e-2], "wd": [1e-4, 1e-2], "seed": [0, 1]}
RUN = dict(num_heads=2, epochs=2, batch_size=16, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory):
    """Tiny separable synthetic features, float16 on disk (converted per batch)."""
    directory = tmp_path_factory.mktemp("features")
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(NUM_CLASSES, NUM_TOKENS, DIM, generator=generator)
    for split, size in (("train", NUM_SAMPLES), ("val", 48), ("test", 48)):
        labels = torch.arange(size) % NUM_CLASSES
        features = centres[labels] + 0.8 * torch.randn(size, NUM_TOKENS, DIM, generator=generator)
        save_features(directory, split, features.half(), labels, meta={"model": "synthetic", "tokens": "cls+ap"})
    return directory


@pytest.fixture(scope="module")
def lockstep(features_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lockstep")
    return run_sweep(features_dir, GRID, out=out, **RUN), out


# --- stacked probes ---------------------------------------------------------------------

@pytest.mark.parametrize("qkv_bias", [False, True])
def test_stacked_equals_independent_probes(qkv_bias):
    seeds = [3, 1, 4]
    stacked = StackedAttentiveFusion.from_seeds(seeds, DIM, 2, NUM_CLASSES, qkv_bias=qkv_bias).double()
    with torch.no_grad():  # move off the init so every parameter matters (biases, BN affine)
        for param in stacked.parameters():
            param.add_(0.1 * torch.randn_like(param))
    probes = [build_probe(seed, DIM, 2, NUM_CLASSES, qkv_bias=qkv_bias).double() for seed in seeds]
    for index, probe in enumerate(probes):
        probe.load_state_dict(stacked.unstack(index), strict=True)
    tokens = torch.randn(8, NUM_TOKENS, DIM, dtype=torch.float64)
    for train in (True, False):
        stacked.train(train)
        logits, attention = stacked(tokens, return_attention=True)
        if train:
            (logits.square().sum() + attention.square().sum()).backward()
        for index, probe in enumerate(probes):
            probe.train(train)
            expected, expected_attention = probe(tokens, return_attention=True)
            torch.testing.assert_close(logits[:, index], expected)
            torch.testing.assert_close(attention[:, index], expected_attention)
            if train:
                (expected.square().sum() + expected_attention.square().sum()).backward()
                named = dict(probe.named_parameters())
                for key, name in PARAMETERS.items():
                    if getattr(stacked, name) is not None:
                        torch.testing.assert_close(getattr(stacked, name).grad[index], named[key].grad, msg=key)
            state = stacked.unstack(index)
            for key in BUFFERS:
                torch.testing.assert_close(state[key], probe.state_dict()[key], msg=key)


def test_stacked_init_and_unstack_round_trip():
    stacked = StackedAttentiveFusion.from_seeds([5, 7], DIM, 2, NUM_CLASSES)
    for index, seed in enumerate((5, 7)):
        torch.manual_seed(seed)
        reference = fastfuse.AttentiveFusion(DIM, 2, NUM_CLASSES)
        state = stacked.unstack(index)
        assert list(state) == list(reference.state_dict())
        for key, value in reference.state_dict().items():
            assert torch.equal(state[key], value), key
        paper = PaperAttentiveProbe(DIM, 2, NUM_CLASSES)
        paper.load_state_dict(state, strict=True)
    assert torch.equal(StackedAttentiveFusion.from_seeds([7], DIM, 2, NUM_CLASSES).q_weight[0], stacked.q_weight[1])


def test_stacked_linear_probe_matches_linear():
    probes = StackedLinearProbe([0, 1], 10, NUM_CLASSES)
    features = torch.randn(12, 10)
    logits = probes(features)
    for index, seed in enumerate((0, 1)):
        torch.manual_seed(seed)
        linear = torch.nn.Linear(10, NUM_CLASSES)
        normed = torch.nn.functional.batch_norm(features, None, None, training=True)
        torch.testing.assert_close(logits[:, index], linear(normed))


# --- optimizer ----------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True])
def test_adamw_equals_torch_adamw(fused):
    """Bit for bit: P=1 against one torch AdamW; P=3 against three, each with its lr and wd."""
    lrs, wds = [1e-3, 3e-4, 1e-2], [0.0, 1e-4, 0.05]
    torch.manual_seed(0)
    stacked = [torch.randn(3, 7, 5, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    single = [[t[p].detach().clone().requires_grad_() for t in stacked] for p in range(3)]
    alone = [t[0:1].detach().clone().requires_grad_() for t in stacked]
    ours = StackedAdamW(stacked, lrs, wds, fused=fused)
    ours_single = StackedAdamW(alone, lrs[:1], wds[:1], fused=fused)
    theirs = [torch.optim.AdamW(single[p], lr=lrs[p], weight_decay=wds[p], fused=fused or None) for p in range(3)]
    for step in range(12):
        factor = cosine_with_warmup(step, 12, 3)
        ours.set_lr_factor(factor)
        ours_single.set_lr_factor(factor)
        grads = [torch.randn_like(t) for t in stacked]
        for tensor, tensor_alone, grad in zip(stacked, alone, grads):
            tensor.grad, tensor_alone.grad = grad.clone(), grad[0:1].clone()
        ours.step()
        ours_single.step()
        for p in range(3):
            for group in theirs[p].param_groups:
                group["lr"] = lrs[p] * factor
            for tensor, grad in zip(single[p], grads):
                tensor.grad = grad[p].clone()
            theirs[p].step()
    for p in range(3):
        for tensor, reference in zip(stacked, single[p]):
            assert torch.equal(tensor[p], reference)
    for tensor, reference in zip(alone, single[0]):
        assert torch.equal(tensor[0], reference)


def test_cosine_with_warmup():
    factors = [cosine_with_warmup(step, 10, 2) for step in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    assert 0 < factors[-1] < 0.05


# --- data and metrics ---------------------------------------------------------------------

def test_batches_and_balanced_accuracy():
    batches = batch_indices(33, 16, data_seed=0, epoch=1)
    assert len(batches) == steps_per_epoch(33, 16) == 2        # the lone 33rd sample is dropped
    assert [b.tolist() for b in batches] == [b.tolist() for b in batch_indices(33, 16, data_seed=0, epoch=1)]
    assert batch_indices(33, 16, 0, 2)[0].tolist() != batches[0].tolist()
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    predictions = torch.tensor([[0, 0], [0, 1], [1, 1], [1, 1], [2, 0], [0, 0]])
    expected = [(2 / 3 + 1 + 1 / 2) / 3, (1 / 3 + 1 + 0) / 3]  # mean recall over classes (sklearn's)
    torch.testing.assert_close(balanced_accuracy(predictions, labels, 3), torch.tensor(expected, dtype=torch.float64))


# --- sweeps -------------------------------------------------------------------------------

def _assert_same_rows(rows, other_rows):
    assert len(rows) == len(other_rows)
    for row, other in zip(rows, other_rows):
        for key in ("index", "lr", "wd", "seed"):
            assert row[key] == other[key], key
        assert row["val_acc"] == other["val_acc"]
        assert row["test_acc"] == other["test_acc"] and row["best_epoch"] == other["best_epoch"]
        assert row["train_loss"] == pytest.approx(other["train_loss"], rel=1e-6, abs=1e-7)


def _assert_same_results(results, other):
    _assert_same_rows(results["probes"], other["probes"])
    assert results["baselines"].keys() == other["baselines"].keys()
    for name in results["baselines"]:
        _assert_same_rows(results["baselines"][name]["probes"], other["baselines"][name]["probes"])
    assert results["best"]["probe_index"] == other["best"]["probe_index"]


def test_lockstep_equals_sequential(features_dir, lockstep):
    sequential = run_sweep(features_dir, GRID, sequential=True, **RUN)
    _assert_same_results(lockstep[0], sequential)
    chunked = run_sweep(features_dir, GRID, probes_per_call=3, **RUN)   # 3 fused-op calls: 3 + 3 + 2 probes
    _assert_same_results(lockstep[0], chunked)
    assert lockstep[0]["timing"]["mode"] == "lockstep" and sequential["timing"]["mode"] == "sequential"
    assert all(row["group_size"] == 1 for row in sequential["probes"])


def test_results_files(lockstep):
    results, out = lockstep
    on_disk = json.loads((out / "results.json").read_text())
    assert len(on_disk["probes"]) == len(SweepGrid.coerce(GRID)) == 8
    for row in on_disk["probes"]:
        for key in ("lr", "wd", "seed", "val_acc", "best_val_acc", "test_acc", "seconds"):
            assert key in row, key
        assert len(row["val_acc"]) == RUN["epochs"]
        assert row["best_val_acc"] == max(row["val_acc"])
        assert row["test_acc"] == row["test_acc_per_epoch"][row["best_epoch"] - 1]
    assert set(on_disk["baselines"]) == {"last_cls", "concat"}
    best = on_disk["best"]
    config_rows = [row for row in on_disk["probes"] if (row["lr"], row["wd"]) == (best["lr"], best["wd"])]
    assert best["val_acc"] == pytest.approx(sum(r["best_val_acc"] for r in config_rows) / len(config_rows))
    assert best["val_acc"] == pytest.approx(max(entry["val_acc"] for entry in on_disk["configs"]))
    assert len(best["mean_attention"]) == 2 and len(best["mean_attention"][0]) == NUM_TOKENS
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 * 3
    assert {"model", "lr", "wd", "seed", "val_acc", "best_val_acc", "test_acc", "seconds"} <= set(rows[0])
    assert json.loads(rows[0]["val_acc"]) == on_disk["probes"][0]["val_acc"]
    pytest.importorskip("matplotlib")
    assert (out / "attention.png").stat().st_size > 0


def test_best_probe_checkpoint(features_dir, lockstep):
    results, out = lockstep
    state = torch.load(out / "best_probe.pt", weights_only=True)
    paper = PaperAttentiveProbe(DIM, 2, NUM_CLASSES)
    paper.load_state_dict(state, strict=True)                       # the paper's keys
    probe = load_best_probe(out)
    paper.eval()
    data = load_sweep_data(features_dir)
    tokens = data.splits["test"].features.float()
    predictions = probe(tokens).argmax(-1)
    torch.testing.assert_close(paper(tokens).argmax(-1), predictions)
    accuracy = balanced_accuracy(predictions, data.splits["test"].labels, NUM_CLASSES)
    assert float(accuracy[0]) == pytest.approx(results["best"]["probe_test_acc"])


def test_weight_decay_refinement():
    assert refine_weight_decays([1e-6, 1e-4, 1e-2], 1e-4) == [1e-5, 1e-3]
    assert refine_weight_decays([1e-6, 1e-4, 1e-2], 1e-2) == [1e-3]
    assert refine_weight_decays([1e-4, 1.1e-4], 1e-4, min_step=0.1) == []   # the step vanished
    with pytest.raises(ValueError, match="log grid"):
        refine_weight_decays([0.0, 1e-4], 1e-4)


def test_wd_search_refines_around_best(features_dir):
    grid = {"lr": [1e-2], "wd": [1e-6, 1e-3, 1.0], "seed": [0]}
    results = run_sweep(features_dir, grid, wd_search=True, wd_search_rounds=3, wd_search_min_step=0.2,
                        baselines=False, **RUN)
    rounds = results["wd_search"]["rounds"]
    assert 1 <= len(rounds) <= 3
    rows = results["probes"]
    tried = sorted(row["wd"] for row in rows[:3])
    for index, new in enumerate(rounds):
        before = [row for row in rows if row["round"] <= index]
        best = max(before, key=lambda row: row["best_val_acc"])["wd"]      # one seed: per-config score
        ordered = sorted({row["wd"] for row in before})
        position = ordered.index(best)
        low, high = ordered[max(position - 1, 0)], ordered[min(position + 1, len(ordered) - 1)]
        for wd in new:
            assert low < wd < high and wd != best                           # strictly between neighbours
            step = abs(math.log10(wd) - math.log10(best))
            assert step >= 0.2 - 1e-9
        assert {row["wd"] for row in rows if row["round"] == index + 1} == set(new)
    assert len({row["wd"] for row in rows}) == len(rows) >= len(tried)


def test_cli(features_dir, tmp_path):
    from fastfuse.cli import main

    code = main(["sweep", "--features", str(features_dir), "--lr", "1e-2", "--wd", "1e-4,1e-2", "--seeds", "0",
                 "--num-heads", "2", "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path),
                 "--no-progress", "--backend", "torch"])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["probes"]) == 2 and results["settings"]["backend"] == "torch"
    with pytest.raises(SystemExit) as refused:  # checked at parse time
        main(["sweep", "--features", str(features_dir), "--lr", "-1", "--out", str(tmp_path)])
    assert refused.value.code == 2


# --- distributed --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank, world_size, port, features_dir, out, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = run_sweep(features_dir, GRID, out=out if rank == 0 else None, **RUN)
        queue.put((rank, json.dumps({key: results[key] for key in ("probes", "baselines", "best")})))
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(features_dir, lockstep, tmp_path):
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    out = tmp_path / "distributed"
    mp.start_processes(_rank_main, args=(2, _free_port(), str(features_dir), str(out), queue), nprocs=2,
                       join=True, start_method="spawn")
    gathered = dict(queue.get() for _ in range(2))
    single = lockstep[0]
    for rank in (0, 1):  # every rank returns the full, gathered results
        _assert_same_results(json.loads(gathered[rank]), single)
    on_disk = json.loads((out / "results.json").read_text())
    _assert_same_results(on_disk, single)
    assert on_disk["timing"]["world_size"] == 2
    assert {row["group_size"] for row in on_disk["probes"]} == {4}      # each rank trained half the grid
    assert (out / "best_probe.pt").exists()


def test_paper_reference_shares_the_training_loop(features_dir):
    """The paper's probe, one configuration at a time through the same epoch loop, follows the
    sweep's probes (same init, batches, schedule, loss): losses agree to float32 rounding."""
    from fastfuse.sweep.paper_reference import train_paper_probes
    from fastfuse.sweep.train import TrainSettings

    data = load_sweep_data(features_dir)
    configs = [config for config in SweepGrid.coerce(GRID).configs() if config.seed == 0][:2]
    settings = TrainSettings(num_heads=2, epochs=2, batch_size=16, baselines=False)
    _, rows = train_paper_probes(data, configs, settings)
    sweep = run_sweep(features_dir, {"lr": [configs[0].lr], "wd": [c.wd for c in configs], "seed": [0]},
                      baselines=False, **RUN)
    for row, other in zip(rows, sweep["probes"]):
        assert (row["lr"], row["wd"]) == (other["lr"], other["wd"])
        assert row["train_loss"] == pytest.approx(other["train_loss"], rel=1e-4)
        assert len(row["val_acc"]) == 2 and row["best_epoch"] in (1, 2) and row["diverged"] is False
