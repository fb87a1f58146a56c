"""The study file: parsing, validation messages, cells and configuration hashes (no training)."""
import pytest

from fastfuse.study import DEMO_STUDY, StudyFileError, parse_study

BASE = """
[study]
name = "t"
[[backbones]]
name = "vit_tiny_patch16_224"
label = "tiny"
img_size = 32
[[datasets]]
name = "digits"
[[datasets]]
name = "gratings"
builtin = "synthetic-gratings"
[probes]
num_heads = 2
epochs = 1
batch_size = 32
[grid]
lr = [1e-3]
wd = [1e-4]
seeds = [0, 1]
"""


def test_cells_are_backbones_by_datasets_and_defaults_apply():
    spec = parse_study(BASE)
    assert [cell.id for cell in spec.cells()] == ["tiny__digits", "tiny__gratings"]
    assert spec.families == ("linear-last-cls", "linear-all-cls+ap", "attentive-fusion")
    assert spec.fused_families == ("attentive-fusion",)
    assert spec.trains_baselines("attentive-fusion")
    assert spec.features == {"layers": "paper", "tokens": "cls+ap", "dtype": "float32", "batch_size": 64,
                             "num_workers": 0}
    assert spec.grid["seeds"] == [0, 1] and spec.grid["wd_search"] is False


def test_hashes_follow_what_decides_each_unit():
    spec = parse_study(BASE)
    cell = spec.cells()[0]
    more_epochs = parse_study(BASE.replace("epochs = 1", "epochs = 2"))
    other_dtype = parse_study(BASE.replace("[probes]", "[features]\ndtype = \"float16\"\n[probes]"))
    assert more_epochs.features_hash(cell) == spec.features_hash(cell)
    assert more_epochs.sweep_hash(cell, "attentive-fusion") != spec.sweep_hash(cell, "attentive-fusion")
    assert other_dtype.features_hash(cell) != spec.features_hash(cell)
    # a changed feature configuration invalidates the sweeps that read those features
    assert other_dtype.sweep_hash(cell, "attentive-fusion") != spec.sweep_hash(cell, "attentive-fusion")
    assert parse_study(BASE).sweep_hash(cell, "attentive-fusion") == spec.sweep_hash(cell, "attentive-fusion")


@pytest.mark.parametrize("edit, field", [
    (("num_heads = 2", "num_heads = 0"), "probes.num_heads"),
    (("num_heads = 2", "num_heads = 2\nfamilies = [\"linear-last-cls\"]"), "fused family"),
    (("num_heads = 2", "num_heads = 2\nfamilies = [\"no-such\"]"), "unknown family 'no-such'"),
    (("lr = [1e-3]", "lr = [-1.0]"), "grid"),
    (("img_size = 32", "img_size = \"big\""), "backbones[0].img_size"),
    (("builtin = \"synthetic-gratings\"", "builtin = \"imagenet\""), "datasets[1].builtin"),
    (("name = \"gratings\"", "name = \"digits\""), "labels must be unique"),
    (("[grid]", "[grids]"), "unknown section"),
    (("epochs = 1", "epochs = 1\nepoch = 3"), "unknown key(s) ['epoch']"),
    (("label = \"tiny\"", "label = \"a/b\""), "backbones[0].label"),
])
def test_bad_fields_are_named(edit, field):
    with pytest.raises(StudyFileError) as error:
        parse_study(BASE.replace(*edit), where="s.toml")
    assert field in str(error.value) and "s.toml" in str(error.value)


def test_bad_toml_and_pretrained_kinds(tmp_path):
    with pytest.raises(StudyFileError, match="not valid TOML"):
        parse_study("[study\n")
    spec = parse_study(BASE.replace("img_size = 32", "pretrained = \"ckpt.pth\""), base=tmp_path)
    assert spec.backbones[0].pretrained == str(tmp_path / "ckpt.pth")  # relative to the study file
    with pytest.raises(StudyFileError, match="pretrained"):
        parse_study(BASE.replace("img_size = 32", "pretrained = 3"))


def test_feature_cache_dataset_pairs_with_its_backbone(tmp_path):
    text = BASE.replace("[[datasets]]\nname = \"digits\"",
                        "[[datasets]]\nname = \"cached\"\nfeatures = \"feats\"\nbackbone = \"tiny\"")
    text = text.replace("[[datasets]]", "[[backbones]]\nname = \"vit_small_patch16_224\"\nlabel = \"small\"\n"
                                        "[[datasets]]", 1)
    spec = parse_study(text, base=tmp_path)
    assert [cell.id for cell in spec.cells()] == ["tiny__cached", "tiny__gratings", "small__gratings"]
    with pytest.raises(StudyFileError, match="backbone"):
        parse_study(text.replace("backbone = \"tiny\"", "backbone = \"nope\""))


def test_demo_study_parses():
    spec = parse_study(DEMO_STUDY)
    assert len(spec.cells()) == 4
    assert {dataset.builtin for dataset in spec.datasets} == {"digits", "synthetic-gratings"}


def test_synthetic_gratings_are_deterministic_balanced_and_oriented():
    import numpy as np

    from fastfuse.study import synthetic

    images, labels = synthetic.generate(6, 32)
    again, _ = synthetic.generate(6, 32)
    assert np.array_equal(images, again) and images.shape == (48, 3, 32, 32)
    assert np.bincount(labels).tolist() == [6] * 8
    assert images.min() >= 0 and images.max() <= 1
    # Orientation 0 deg varies along x (columns), 90 deg along y (rows): compare gradient energy.
    grey = images.mean(1)
    along_x = np.abs(np.diff(grey, axis=2)).mean(axis=(1, 2))
    along_y = np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2))
    horizontal = [index for index, label in enumerate(labels) if synthetic.CLASSES[label].endswith("-0deg")]
    vertical = [index for index, label in enumerate(labels) if synthetic.CLASSES[label].endswith("-90deg")]
    assert all(along_x[i] > along_y[i] for i in horizontal) and all(along_y[i] > along_x[i] for i in vertical)
