"""Sweeps over the other pooler families (--probe timm-map/vjepa/aim/ep): P probes in lockstep
with one fused-op call compute exactly what each standalone probe computes."""
import json

import pytest
import torch

from fastfuse.features import save_features
from fastfuse.sweep import run_sweep
from fastfuse.sweep.cli import add_arguments, run
from fastfuse.sweep.families import FAMILIES, FamilyBank, build_family_probe

NUM_TOKENS, DIM, NUM_CLASSES, HEADS = 6, 16, 3, 2


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("features")
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(NUM_CLASSES, NUM_TOKENS, DIM, generator=generator)
    for split, size in (("train", 48), ("val", 24), ("test", 24)):
        labels = torch.arange(size) % NUM_CLASSES
        features = centres[labels] + 0.8 * torch.randn(size, NUM_TOKENS, DIM, generator=generator)
        save_features(directory, split, features.half(), labels, meta={"model": "synthetic", "tokens": "cls+ap"})
    return directory


def _standalone_step(probe, tokens, weight):
    out = probe(tokens)
    (out * weight).sum().backward()
    return out


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bank_equals_standalone_probes(family, training):
    seeds = [0, 1, 2]
    bank = FamilyBank.from_seeds(family, seeds, DIM, HEADS, NUM_CLASSES, backend="torch").double().train(training)
    # Standalone probes built as the bank built them (same seeds), before any step.
    probes = []
    for seed in seeds:
        torch.manual_seed(seed)
        probes.append(build_family_probe(family, DIM, HEADS, NUM_CLASSES, "torch").double().train(training))
    for p, probe in enumerate(probes):
        for key, value in probe.state_dict().items():
            assert torch.equal(value, bank.unstack(p)[key].to(value.dtype)), key
    tokens = torch.randn(4, NUM_TOKENS, DIM, dtype=torch.float64) + 0.3
    weight = torch.randn(4, len(seeds), NUM_CLASSES, dtype=torch.float64)
    logits, attention = bank(tokens, return_attention=True)
    (logits * weight).sum().backward()
    assert attention.shape[:2] == (4, len(seeds))
    stacked = dict(bank.stacked.items())
    for p, probe in enumerate(probes):
        out = _standalone_step(probe, tokens, weight[:, p])
        torch.testing.assert_close(logits[:, p], out, rtol=1e-10, atol=1e-12)
        for position, key in enumerate(bank._keys):
            if str(position) in stacked:
                expected = dict(probe.named_parameters())[key].grad
                torch.testing.assert_close(stacked[str(position)].grad[p], expected, rtol=1e-9, atol=1e-12)
        for key, value in probe.state_dict().items():   # running buffers (AIM) after the step
            torch.testing.assert_close(bank.unstack(p)[key].to(value.dtype), value, rtol=1e-12, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_runs_each_family(features_dir, tmp_path, family):
    results = run_sweep(features_dir, {"lr": [1e-3, 1e-2], "wd": [1e-4], "seed": [0]}, probe=family,
                        num_heads=HEADS, epochs=2, batch_size=16, progress=False, baselines=False,
                        out=tmp_path / "out", plots=False)
    assert results["best"]["probe"]["family"] == family
    assert 0.0 <= results["best"]["val_acc"] <= 1.0
    checkpoint = torch.load(tmp_path / "out" / results["best"]["checkpoint"], weights_only=False)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    probe = build_family_probe(family, DIM, HEADS, NUM_CLASSES)
    probe.load_state_dict({key: value for key, value in state.items()}, strict=True)


def test_cli_probe_option(features_dir, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--features", str(features_dir), "--probe", "aim", "--lr", "1e-3", "--wd", "1e-4",
                              "--num-heads", "2", "--epochs", "1", "--batch-size", "16", "--out",
                              str(tmp_path / "cli"), "--no-progress", "--no-plots", "--no-baselines"])
    assert run(args) == 0
    saved = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert saved["best"]["probe"]["family"] == "aim"
    with pytest.raises(SystemExit):
        parser.parse_args(["--features", "x", "--probe", "nope"])
