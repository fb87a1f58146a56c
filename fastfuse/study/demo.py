"""``python -m fastfuse study demo --out DIR``: a small complete study that downloads nothing.

Two small, randomly initialised timm ViTs x two datasets: scikit-learn's bundled 8x8 digits and
``synthetic-gratings`` (generated here: oriented gratings in disk or square envelopes, see
:mod:`fastfuse.study.synthetic`). The three probe families on a 2 x 2 x 2 grid (lr x wd x seeds).
The backbones are random, so the accuracies show the pipeline, not the paper's numbers.
"""
from __future__ import annotations

from pathlib import Path

from ..storage import write_text
from . import units

DEMO_STUDY = """\
# fastfuse study demo: two random ViTs x two datasets that need no download.
[study]
name = "demo"
seed = 0                      # the random init of the backbones

[[backbones]]
name = "vit_tiny_patch16_224"
label = "vit-tiny"
img_size = 64                 # 4 x 4 patches: small and quick
pretrained = false            # true: timm's weights (downloaded and cached); or a checkpoint path

[[backbones]]
name = "vit_small_patch16_224"
label = "vit-small"
img_size = 64
pretrained = false

[[datasets]]
name = "digits"               # scikit-learn's 8x8 digits, bundled

[[datasets]]
name = "gratings"
builtin = "synthetic-gratings"  # SYNTHETIC: oriented gratings in disk / square envelopes

[features]
layers = "paper"              # every block's norm2 and the final norm
tokens = "cls+ap"
dtype = "float32"
batch_size = 64

[probes]
families = ["linear-last-cls", "linear-all-cls+ap", "attentive-fusion"]
num_heads = 4
epochs = 8
batch_size = 128

[grid]
lr = [1e-3, 3e-3]
wd = [1e-4, 1e-2]
seeds = [0, 1]
"""


def write_demo_study(out) -> Path:
    """Writes the demo's study file into the study folder ``out``; returns the folder."""
    out = Path(out)
    path = out / units.STUDY_FILE
    if not path.exists() or path.read_text(encoding="utf-8") != DEMO_STUDY:
        write_text(path, DEMO_STUDY)
    return out
