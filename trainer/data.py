"""Stage two's data path: the resumable sampler and the batch dataset that reads the store.

The sampler lives in the main process. Its stream is a pure function of (seed, epoch, step), so
its state is just (seed, epoch, position) and a resumed run replays exactly the batches an
uninterrupted run would have seen. Each epoch is a seeded permutation of the cached (valid) rows,
cut to a whole number of global batches so that every DDP rank takes the same number of steps;
rank r takes every world-th image of each global batch.

View rule: epoch e uses cached view k = e mod K for every image, so each of the K views is used
once every K epochs and a batch's targets are one orthogonal selection per array.

The dataset is indexed by a batch request (epoch, step, micro-batch). A DataLoader worker builds
the whole micro-batch: it reads the targets of all its images in one selection, decodes the
images, replays v0 and Ic from the stored parameters (the pixels the teacher saw) and draws fresh
v1, v2 from a generator seeded by (seed, epoch, image index).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dpal.corpus import decode_image
from dpal.store import StoreError, StoreReader, shard_name
from dpal.trainer.losses import shape_mask
from dpal.views import ViewRecipe, background_index, random_local, replay, view_rng

# B batch, D teacher width, P patches of v0, T tokens of Ic


@dataclass
class SamplerState:
    seed: int
    epoch: int
    position: int  # optimizer steps already taken in `epoch`


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
            raise ValueError(
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
    """

    def __init__(self, store_path: str | Path, sampler: EpochSampler, recipe: ViewRecipe, seed: int,
                 grad_accum: int = 1, read_targets: bool = True, allow_incomplete: bool = False,
                 mask_fix_sign: bool | None = None) -> None:
        self.store_path = str(store_path)
        self.sampler = sampler
        self.recipe = recipe
        self.seed = seed
        self.grad_accum = grad_accum
        self.read_targets = read_targets
        self.allow_incomplete = allow_incomplete
        self.mask_fix_sign = mask_fix_sign
        self.num_views = 0
        self._reader: StoreReader | None = None

    @property
    def reader(self) -> StoreReader:
        if self._reader is None:  # opened lazily, once per worker process
            self._reader = StoreReader(self.store_path, allow_incomplete=self.allow_incomplete)
        return self._reader

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}

    def indices(self, req: BatchRequest) -> np.ndarray:
        full = self.sampler.batch(req.epoch, req.step)
        micro = len(full) // self.grad_accum
        return full[req.micro * micro : (req.micro + 1) * micro]

    def _image(self, index: int):
        try:
            return decode_image(self.reader.image_bytes(index))
        except Exception as e:  # noqa: BLE001 - any failure here means the store changed under us
            raise StoreError(f"{self.store_path}: cannot read the image of row {index} "
                             f"(shard {shard_name(self.reader.shard_of(index))}): {e}") from None

    def __getitem__(self, req: BatchRequest) -> dict[str, Tensor]:
        idx = self.indices(req)
        reader = self.reader
        view = req.epoch % reader.layout.num_views
        if self.read_targets:
            try:
                t = reader.read_targets(idx, view)
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001 - any other failure to read a damaged shard file
                shards = ", ".join(sorted({shard_name(reader.shard_of(int(i))) for i in idx}))
                raise StoreError(f"{self.store_path}: data of shard(s) {shards} cannot be read "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); run "
                                 "`dpal store verify` and rerun stage one to rewrite them") from None
            params = t.params
        else:
            t = None
            params = reader.read_params(idx, view)  # checked against the markers; names a bad shard
        v0s, ics, v1s, v2s = [], [], [], []
        cache: dict[int, object] = {}
        for i, index in enumerate(idx.tolist()):
            if index not in cache:
                cache[index] = self._image(index)
            bg_i = background_index(params[i])
            if bg_i not in cache:
                cache[bg_i] = self._image(bg_i)
            v0, ic = replay(self.recipe, params[i], cache[index], cache[bg_i])
            rng = view_rng(self.seed, str(index), req.epoch, stream="local")
            v0s.append(v0)
            ics.append(ic)
            v1s.append(random_local(self.recipe, rng, cache[index]))
            v2s.append(random_local(self.recipe, rng, cache[index]))
        out = {
            "index": torch.from_numpy(idx.copy()),
            "v0": torch.stack(v0s), "v1": torch.stack(v1s), "v2": torch.stack(v2s), "ic": torch.stack(ics),
        }
        if t is not None:
            out.update(g_t=t.global_, local_t=t.local, rel_t=t.relation)
            if self.mask_fix_sign is not None:
                grid = tuple(reader.attrs["token_grid"]["global"])
                out["mask"] = shape_mask(t.local, grid, self.mask_fix_sign)  # (B, P, 1)
        return out


class LoaderError(RuntimeError):
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


def collate_requests(sampler: EpochSampler, start_epoch: int, start_step: int, end_epoch: int,
                     max_steps_left: int | None, grad_accum: int) -> list[BatchRequest]:
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
