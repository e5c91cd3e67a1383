"""The process around stage two's step: torchrun's rank and device, the stop signals, the allocator,
and how many DataLoader workers to start.

SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) make every rank stop at the same step boundary (`StopFlag`,
agreed by an all-reduce); a second Ctrl-C aborts at once. The DataLoader's forkserver and workers
ignore SIGTERM and SIGUSR1 (`children_ignore_stop_signals`), so that a scheduler's signal to the
whole process group leaves them alive until this process has checkpointed.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dpal.common import resolve_device
from dpal.errors import ConfigError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
CPU_NUM_WORKERS = 2
MAX_GPU_NUM_WORKERS = 16


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_pref, local_rank=info.local_rank)  # one GPU per rank
    check_device(device, device_pref)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info, device


def check_device(device: torch.device, asked: str) -> None:
    """Refuse, in one line and before anything is written, a CUDA device this process cannot see."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {asked}: torch sees no CUDA device here (no GPU, no driver, or CUDA_VISIBLE_DEVICES "
            "hides it); use --device cpu, or auto to take a GPU where there is one"
        )
    if (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {asked}: this process sees {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )


def keep_freed_memory() -> bool:
    """Make glibc keep large freed blocks for reuse instead of returning them to the kernel.

    A CPU step allocates and frees the same few large tensors every time (the expert generator's
    28M-float weight gradient, 113 MB, among them). glibc serves blocks above 32 MB with fresh
    mmaps, and every fresh page costs a page fault: about 30 ms per such tensor, 13% of a CPU step
    (docs/benchmarks.md). With mmap disabled for the heap and trimming raised, those blocks come
    back from the heap. Peak memory is unchanged; freed memory stays with the process. Returns
    False where the C library has no `mallopt` (not glibc), which changes nothing else.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def default_num_workers(device: torch.device, local_world_size: int) -> int:
    """DataLoader workers when the config leaves them unset.

    On CPU, 2: a worker builds a batch in a tenth of a step, and more workers only compete with the
    training threads (1 and 2 workers measured the same). On a GPU the loader bounds training (one
    worker decodes and replays 80-95 images/s on the development CPU; an H200 trains about 1800 images/s), so every
    CPU this rank may use but one (which drives the GPU) decodes, at most 16.
    """
    if device.type != "cuda":
        return CPU_NUM_WORKERS
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(CPU_NUM_WORKERS, min(MAX_GPU_NUM_WORKERS, cpus // max(local_world_size, 1) - 1))


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT; ranks agree on it at each step boundary. A second SIGINT
    raises KeyboardInterrupt at once (the user asked twice), without a checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self.signum = 0
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            # os.write: a handler may run while the main thread is inside a write to sys.stderr
            os.write(
                2, b"\nCtrl-C: stopping at the end of this step to checkpoint (Ctrl-C again aborts without)\n"
            )

    def agreed(self, info: DistInfo, device: torch.device) -> bool:
        if info.world_size == 1:
            return self.requested
        # the largest signal number any rank got, so that rank 0 can say which stopped the run
        flag = torch.tensor([float(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        got = int(flag.item())
        if got and not self.requested:
            self.signal_name = signal.Signals(got).name
        return got > 0


@contextmanager
def children_ignore_stop_signals() -> Iterator[None]:
    """Processes started inside ignore SIGTERM and SIGUSR1; this one keeps its handlers.

    A scheduler signals the whole process group; the DataLoader's forkserver and workers must
    outlive it so that this process can finish the step and checkpoint. SIG_IGN is inherited
    through fork and exec (a blocked mask is not enough: multiprocessing unblocks SIGTERM when it
    starts its resource tracker). The signals are also blocked here meanwhile, so that one that
    arrives stays pending (Linux never discards a blocked signal) and reaches the handler after.
    """
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
