"""Stage two's data path: the resumable sampler and the batch dataset that reads the store.

The sampler lives in the main process. Its stream is a pure function of (seed, epoch, step), so
its state is just (seed, epoch, position) and a resumed run replays exactly the batches an
uninterrupted run would have seen. Each epoch is a seeded permutation of the cached (valid) rows,
cut to a whole number of global batches so that every DDP rank takes the same number of steps;
rank r takes every world-th image of each global batch.

View rule: epoch e uses cached view k = e mod K for every image, so each of the K views is used
once every K epochs and a batch's targets are one orthogonal selection per array.

The dataset is indexed by a batch request (epoch, step, micro-batch). A DataLoader worker builds
the whole micro-batch: it reads the targets of all its images in one selection (in the store's
dtype), decodes the images, replays the PIL part of v0 and Ic from the stored parameters (the
pixels the teacher saw, as uint8) and draws the parameters of fresh v1, v2 from a generator seeded
by (seed, epoch, image index). `BatchDataset.model_inputs` then makes the float32 inputs on the
training device, batched (trainer.augment): v0 and Ic bit for bit as stage one made them, the
local crops from their parameters, the targets decoded. A batch is a pure function of
(seed, epoch, step, micro-batch), whichever process builds it.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dpal.corpus import decode_image
from dpal.errors import InputError, UserError
from dpal.store import LOCAL, Layout, StoreError, StoreReader, shard_name
from dpal.trainer.augment import model_inputs
from dpal.trainer.losses import shape_mask
from dpal.trainer.recipes import EVERYTHING, Needs
from dpal.views import (
    NUM_AUG,
    ViewRecipe,
    background_index,
    paste_positions,
    replay_pixels,
    replay_v0,
    sample_local,
    view_rng,
)

# B batch, D teacher width, P patches of v0, T tokens of Ic


class EpochSampler:
    """Deterministic per-epoch batches of store rows for one rank.

    Args:
        valid: (M,) store indices of the cached images.
        batch_size: images per rank per optimizer step.
        world_size: number of ranks.
        rank: this rank.
        seed: sampler seed.
    """

    def __init__(self, valid: np.ndarray, batch_size: int, world_size: int, rank: int, seed: int) -> None:
        self.valid = np.asarray(valid, dtype=np.int64)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.steps_per_epoch = len(self.valid) // (batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise InputError(
                f"the store has {len(self.valid)} cached images, fewer than one global batch "
                f"({batch_size} x {world_size} ranks); lower --batch-size"
            )

    def epoch_order(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.valid[torch.randperm(len(self.valid), generator=g).numpy()]

    def batch(self, epoch: int, step: int) -> np.ndarray:
        """This rank's store indices for optimizer step `step` of `epoch` (B,)."""
        order = self.epoch_order(epoch)
        gb = self.batch_size * self.world_size
        global_batch = order[step * gb : (step + 1) * gb]
        return global_batch[self.rank :: self.world_size]


@dataclass(frozen=True)
class BatchRequest:
    epoch: int
    step: int  # step within the epoch
    micro: int  # micro-batch within the step (gradient accumulation)


class BatchDataset(torch.utils.data.Dataset):
    """Builds one micro-batch per request: replayed v0 and Ic, fresh v1 and v2, and targets.

    Args:
        store_path: the store.
        sampler: the rank's sampler (pure; pickled into workers).
        recipe: the store's view recipe.
        seed: seed of the fresh local crops.
        grad_accum: micro-batches per step.
        read_targets: False in online-teacher mode (only the view parameters are read).
        allow_incomplete: passed to StoreReader.
        mask_fix_sign: when not None (and targets are read), also return the shape mask of the
            batch's teacher patches as `mask`, with this `fix_sign`. The mask depends on the
            targets alone, so the DataLoader workers compute it (an eigendecomposition, about 4%
            of a CPU step) while the main process trains.
        finish_on_cpu: build the model's inputs in the worker (`model_inputs` on the CPU, one
            thread) instead of shipping uint8 views for the training device to finish. For CPU
            training: the workers then do that work while the main process trains.
        needs: what the run's model reads (recipes.batch_needs); the rest is not built: targets not
            read, v1 and v2 not drawn (their generator is their own: v0 and Ic do not move), Ic's
            background not decoded nor replayed. What is built is bit for bit the full batch's.
    """

    def __init__(
        self,
        store_path: str | Path,
        sampler: EpochSampler,
        recipe: ViewRecipe,
        seed: int,
        grad_accum: int = 1,
        read_targets: bool = True,
        allow_incomplete: bool = False,
        mask_fix_sign: bool | None = None,
        finish_on_cpu: bool = False,
        needs: Needs = EVERYTHING,
    ) -> None:
        self.store_path = str(store_path)
        self.sampler = sampler
        self.recipe = recipe
        self.seed = seed
        self.grad_accum = grad_accum
        self.read_targets = read_targets
        self.allow_incomplete = allow_incomplete
        self.mask_fix_sign = mask_fix_sign
        self.finish_on_cpu = finish_on_cpu
        self.needs = needs
        self.num_views = 0
        self._reader: StoreReader | None = None
        self._rotations: dict[torch.device, Tensor] = {}

    @property
    def reader(self) -> StoreReader:
        if self._reader is None:  # opened lazily, once per worker process
            self._reader = StoreReader(self.store_path, allow_incomplete=self.allow_incomplete)
        return self._reader

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None, "_rotations": {}}

    def rotation_on(self, device: torch.device) -> Tensor | None:
        """An int8-rotated store's R (D, D) float32 on `device`, moved there once; None for any
        other dtype (the store's R is read and checked once per reader, `StoreReader.rotation`)."""
        r = self.reader.rotation
        if r is None:
            return None
        if device not in self._rotations:
            self._rotations[device] = torch.from_numpy(r).to(device)
        return self._rotations[device]

    def indices(self, req: BatchRequest) -> np.ndarray:
        full = self.sampler.batch(req.epoch, req.step)
        micro = len(full) // self.grad_accum
        return full[req.micro * micro : (req.micro + 1) * micro]

    def _image(self, index: int):
        try:
            return decode_image(self.reader.image_bytes(index))
        except Exception as e:  # noqa: BLE001 - any failure here means the store changed under us
            raise StoreError(
                f"{self.store_path}: cannot read the image of row {index} "
                f"(shard {shard_name(self.reader.shard_of(index))}): {e}"
            ) from None

    def __getitem__(self, req: BatchRequest) -> dict[str, Tensor]:
        batch = self.build(req)
        if self.finish_on_cpu:
            # one thread, as in a worker: the same bits with --num-workers 0 (reductions may split
            # differently over more threads)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                cpu = torch.device("cpu")
                batch = model_inputs(batch, self.recipe, cpu, *self._decoding(batch, cpu))
            finally:
                torch.set_num_threads(threads)
        return batch

    def build(self, req: BatchRequest, seconds: dict[str, float] | None = None) -> dict[str, Tensor]:
        """One micro-batch as the worker ships it (`model_inputs` turns it into the model's inputs):

        index (B,) int64; v0_u8 (B, Hg, Wg, 3), bg_u8 (B, Hc, Wc, 3), pa_u8 and pb_u8 (B, Hl, Wl, 3)
        uint8, the replayed parts of v0 and Ic (views.replay_pixels); paste (B, 4) int64; src_u8
        (B, Hs, Ws, 3) uint8, the part of each decoded image that v1 and v2 read (`_crop_to_boxes`),
        padded to the largest by repeating its last row and column, src_hw (B, 2) int64 their
        sizes, local_aug (B, 2, NUM_AUG) float64 the parameters of v1 and v2 (boxes relative to
        that part); with targets, g_t (B, D), local_t (B, P, D), rel_t (B, T, T) in the
        store's dtype (int8 and int8-rotated add g_t_scale, local_t_scale, rel_t_scale; int8-rotated's
        g_t and local_t are in R's basis, rotated back in model_inputs) and, when asked, mask. From
        a factor store (schema 3) rel_t is Z (B, T, r) float16 and rel_t_diag (B, T) float32.
        Only what `needs` asks for: no bg_u8, pa_u8, pb_u8, paste without Ic; no src_u8, src_hw,
        local_aug without v1, v2; only the targets (and their scales) it names.

        Args:
            req: the request.
            seconds: when given, the CPU seconds of each part are added to it by name (bench_loader.py).
        """
        lap = _Laps(seconds)
        idx = self.indices(req)
        reader = self.reader
        view = req.epoch % reader.layout.num_views
        out: dict[str, Tensor] = {"index": torch.from_numpy(idx.copy())}
        needs = self.needs
        if self.read_targets and needs.targets:
            params = self._targets(idx, view, out)
        else:
            params = reader.read_params(idx, view)  # checked against the markers; names a bad shard
        lap("read targets")
        r = self.recipe
        b = len(idx)
        sizes = (
            ("v0_u8", r.global_size),
            ("pa_u8", r.local_size),
            ("pb_u8", r.local_size),
            ("bg_u8", r.crowd_size),
        )  # views.replay_pixels' order
        parts = {name: np.empty((b, *hw, 3), dtype=np.uint8) for name, hw in sizes[: 4 if needs.ic else 1]}
        paste = np.empty((b, 4), dtype=np.int64)
        local_aug = np.empty((b, 2, NUM_AUG), dtype=np.float64)
        cache: dict[int, Image.Image] = {}
        sources = []
        for i, index in enumerate(idx.tolist()):
            bg_i = background_index(params[i])
            for j in (index, bg_i) if needs.ic else (index,):
                if j not in cache:
                    cache[j] = self._image(j)
            lap("decode")
            if needs.ic:
                pixels = replay_pixels(r, params[i], cache[index], cache[bg_i])
                paste[i] = paste_positions(params[i])
            else:
                pixels = (replay_v0(r, params[i], cache[index]),)
            for name, image in zip(parts, pixels, strict=True):
                parts[name][i] = np.asarray(image)
            lap("replay v0, A, B, background (PIL)")
            if needs.local_crops:  # a generator of its own per image: skipping it moves no other view
                rng = view_rng(self.seed, str(index), req.epoch, stream="local")
                image = np.asarray(cache[index])
                local_aug[i, 0] = sample_local(r, rng, image.shape[:2])
                local_aug[i, 1] = sample_local(r, rng, image.shape[:2])
                sources.append(_crop_to_boxes(image, local_aug[i]))
                lap("local crop parameters")
        out.update({k: torch.from_numpy(v) for k, v in parts.items()})
        if needs.ic:
            out["paste"] = torch.from_numpy(paste)
        if needs.local_crops:
            out.update(local_aug=torch.from_numpy(local_aug), **_pad_sources(sources))
        lap("collate")
        return out

    def _targets(self, idx: np.ndarray, view: int, out: dict[str, Tensor]) -> np.ndarray:
        """Reads the targets `needs` names into `out` (raw, `build`'s keys) and the shape mask when
        asked; returns the rows' view parameters (B, NUM_PARAMS)."""
        reader = self.reader
        try:
            t = reader.read_targets(idx, view, raw=True, targets=self.needs.targets)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - any other failure to read a damaged shard file
            shards = ", ".join(sorted({shard_name(reader.shard_of(int(i))) for i in idx}))
            raise StoreError(
                f"{self.store_path}: data of shard(s) {shards} cannot be read "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); run "
                "`dpal store verify` and rerun stage one to rewrite them"
            ) from None
        for key, value in (("g_t", t.global_), ("local_t", t.local), ("rel_t", t.relation)):
            if value is not None:  # None: a target the run does not read
                out[key] = value
        if t.relation_diag is not None:  # a factor store: Z and the diagonal, rebuilt in model_inputs
            out["rel_t_diag"] = t.relation_diag
        for key, scale in zip(("g_t_scale", "local_t_scale", "rel_t_scale"), t.scales or (), strict=False):
            if scale is not None:
                out[key] = scale
        if self.mask_fix_sign is not None and t.local is not None:
            grid = reader.store_meta.token_grid.global_grid
            # int8-rotated tokens are left in R's basis: the mask is the tokens' centred projection
            # on their top principal axis, which a rotation does not change (the worker is spared a
            # B*P x D x D matmul; tests/test_token_rotation.py compares the two masks)
            local = reader.layout.codec(LOCAL).decode(t.local, None if t.scales is None else t.scales[1])
            out["mask"] = shape_mask(local, grid, self.mask_fix_sign)  # (B, P, 1)
        return t.params

    def model_inputs(self, batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        """A batch of this dataset -> the model's inputs on `device` (trainer.augment.model_inputs);
        a batch finished on the CPU (`finish_on_cpu`) is only moved."""
        if self.finish_on_cpu:
            return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return model_inputs(batch, self.recipe, device, *self._decoding(batch, device))

    def _decoding(
        self, batch: dict[str, Tensor], device: torch.device
    ) -> tuple[Layout | None, Tensor | None]:
        """The store's layout (its codecs) when the batch has targets, and R on `device` when it has
        global or local targets to rotate back (online-teacher batches have none: nothing is read
        or moved to the device)."""
        if not {"g_t", "local_t", "rel_t"} & set(batch):
            return None, None
        rotation = self.rotation_on(device) if "g_t" in batch or "local_t" in batch else None
        return self.reader.layout, rotation


class _Laps:
    """Adds the CPU seconds of this process since the previous lap to a named entry of `seconds` (a
    no-op when None). CPU time, not wall time: other jobs on the machine barely change it."""

    def __init__(self, seconds: dict[str, float] | None) -> None:
        self.seconds = seconds
        self.t = time.process_time()

    def __call__(self, name: str) -> None:
        if self.seconds is not None:
            now = time.process_time()
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self.t
            self.t = now


def _crop_to_boxes(image: np.ndarray, augs: np.ndarray) -> np.ndarray:
    """The part of `image` (H, W, 3) that the crop boxes of `augs` (n, NUM_AUG) read, plus one pixel
    around (bilinear sampling near a box edge reads the pixel beyond it), clipped to the image;
    shifts the boxes in place to its origin. A large photo then ships its crops' region, not all."""
    h, w = image.shape[:2]
    top = max(int(augs[:, 0].min()) - 1, 0)
    left = max(int(augs[:, 1].min()) - 1, 0)
    bottom = min(int((augs[:, 0] + augs[:, 2]).max()) + 1, h)
    right = min(int((augs[:, 1] + augs[:, 3]).max()) + 1, w)
    augs[:, 0] -= top
    augs[:, 1] -= left
    return image[top:bottom, left:right]


def _pad_sources(sources: list[np.ndarray]) -> dict[str, Tensor]:
    """src_u8 (B, Hs, Ws, 3): each (H, W, 3) image at the top left, its last column and row repeated
    to the largest size; src_hw (B, 2) the true sizes."""
    hs = max(s.shape[0] for s in sources)
    ws = max(s.shape[1] for s in sources)
    out = np.empty((len(sources), hs, ws, 3), dtype=np.uint8)
    for i, s in enumerate(sources):
        h, w = s.shape[:2]
        out[i, :h, :w] = s
        out[i, :h, w:] = s[:, w - 1 : w]
        out[i, h:] = out[i, h - 1 : h]
    hw = np.array([s.shape[:2] for s in sources], dtype=np.int64).reshape(-1, 2)
    return {"src_u8": torch.from_numpy(out), "src_hw": torch.from_numpy(hw)}


class LoaderError(UserError, RuntimeError):
    """The DataLoader's worker processes died (out of memory or of shared memory, or killed)."""


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a SIGTERM or SIGUSR1 sent to the whole process group must not kill
    the workers; the main process stops at a step boundary, checkpoints and shuts them down."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def valid_rows(reader: StoreReader) -> np.ndarray:
    """Store indices of the cached images (of finished shards, for an incomplete store), checked
    against the shards' markers (StoreReader.valid_rows)."""
    return reader.valid_rows()


def collate_requests(
    sampler: EpochSampler,
    start_epoch: int,
    start_step: int,
    end_epoch: int,
    max_steps_left: int | None,
    grad_accum: int,
) -> list[BatchRequest]:
    """The flat list of micro-batch requests from a resume point to the end of training."""
    out: list[BatchRequest] = []
    steps = 0
    for e in range(start_epoch, end_epoch):
        for s in range(start_step if e == start_epoch else 0, sampler.steps_per_epoch):
            if max_steps_left is not None and steps >= max_steps_left:
                return out
            out.extend(BatchRequest(e, s, m) for m in range(grad_accum))
            steps += 1
    return out
