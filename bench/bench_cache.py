"""Stage-one benchmark: throughput overhead of `cache_shard`, and size and error of each store dtype.

Throughput. The unit of stage one, `pipeline.cache.cache_shard`, runs on a real store on disk
(read, decode, sample views, replay, teacher, encode, write, checksum, marker). Its views/s is
divided by the teacher's forward-only views/s on the very same views, replayed beforehand into
tensors and fed in the same batches. The two are timed alternately (A B, B A, ...) in one process
and the median of the per-pair ratios is reported, so that other load on the machine hits both
alike. Target: >= 0.85. The non-teacher time is split by wrapping the names `cache_shard` calls
(`replay`, `teacher_targets`, `write_shard`); what is left is reading, decoding and sampling.

Size and error. One set of float32 teacher targets (a batch of real views) is encoded and decoded
with `store.encode`/`store.decode` for every dtype, and also written to and read back from a real
store per dtype (`store.write_shard`, `StoreReader.read_targets`). Reported: bytes per cached view
(`Layout.bytes_per_view` and bytes on disk), the worst absolute error against float32, that error
relative to max |x|, the smallest per-token cosine similarity (target for int8: >= 0.999) and,
for the relation logits, the worst error of the row softmax and the KL(float32 || dtype) per row
(what the loss consumes).

Replay threads. The views/s of the replay stage alone (as `cache_shard` runs it, through
`pipeline.cache.batches_ahead`) with 1 thread and with `--threads` threads, alternated: what one worker
can feed a GPU teacher, where `cache_shard` replays on the worker's threads (`replay_threads`).

Run from the repository root (2 CPU cores, a few minutes):

    .venv/bin/python bench/bench_cache.py --json /tmp/dpal_bench/cache.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timing import alternate, pair_ratios

import dpal.pipeline.cache as cache_mod
from dpal.config import CacheConfig
from dpal.corpus import decode_image, index_corpus, read_bytes
from dpal.pipeline.cache import batches_ahead, cache_shard, teacher_spec
from dpal.pipeline.prepare import prepare_store
from dpal.store import (
    FEATURES,
    GLOBAL,
    IMAGES_DIR,
    LOCAL,
    MARKERS_DIR,
    PARAMS,
    RELATION,
    SCALE_SUFFIX,
    TOKEN_ROTATION,
    ShardData,
    StoreReader,
    decode,
    encode,
    token_rotation,
    write_shard,
)
from dpal.store.codecs import DTYPES
from dpal.teachers import Teacher, load_teacher
from dpal.views import background_index, replay, sample_view

# N images, K views per image, B batch, P patches of v0, T crowd tokens, D teacher width

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CORPUS = REPO / "sample_data" / "corpus"
VIDEO = REPO.parent / "shared" / "data" / "vtest.avi"  # docs/sample_data.md
TEACHER = "vit_base_patch16_224"


# ---------------------------------------------------------------- corpus


def make_corpus(out: Path, num_images: int, seed: int = 0) -> tuple[Path, str]:
    """A folder of `num_images` person-sized JPEGs; returns (folder, description).

    Uses `num_images` evenly spaced images of sample_data/corpus when it holds enough; else crops
    of vtest.avi frames (real photographs of a courtyard with pedestrians), 128..256 px tall,
    aspect w/h about 0.5; else PIL-drawn images of the same sizes. The folder is reused when it
    already holds the same selection.
    """
    out = Path(out)
    sample = sorted(p for p in SAMPLE_CORPUS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    use_sample = len(sample) >= num_images
    if use_sample:
        picked = [sample[i * len(sample) // num_images] for i in range(num_images)]
        desc = (
            f"{num_images} evenly spaced of the {len(sample)} images of sample_data/corpus "
            f"(sha256 of names {hashlib.sha256(' '.join(p.name for p in picked).encode()).hexdigest()[:8]})"
        )
    desc_file = out / "SOURCE.txt"
    if desc_file.exists() and len(list(out.glob("*.*"))) == num_images + 1:
        old = desc_file.read_text().strip()
        if (use_sample and old == desc) or (not use_sample and "sample_data" not in old):
            return out, old
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if use_sample:
        for i, p in enumerate(picked):
            shutil.copy(p, out / f"{i:04d}{p.suffix.lower()}")
    else:
        from PIL import Image

        rng = np.random.default_rng(seed)
        frames = _video_frames(num_images, rng)
        for i in range(num_images):
            h = int(rng.integers(128, 257))
            w = max(48, int(round(h * rng.uniform(0.45, 0.55))))
            if frames:
                frame = frames[i]
                top = int(rng.integers(0, frame.shape[0] - h + 1))
                left = int(rng.integers(0, frame.shape[1] - w + 1))
                img = Image.fromarray(frame[top : top + h, left : left + w])
            else:
                img = _drawn_person(rng, h, w)
            img.save(out / f"{i:04d}.jpg", quality=90)
        desc = (
            f"{num_images} JPEG crops (128..256 px tall, w/h ~0.5, quality 90) of vtest.avi frames"
            if frames
            else f"{num_images} PIL-drawn JPEGs (128..256 px tall, w/h ~0.5)"
        )
    desc_file.write_text(desc + "\n")
    return out, desc


def _video_frames(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    try:
        import cv2
    except ImportError:
        return []
    if not VIDEO.exists():
        return []
    cap = cv2.VideoCapture(str(VIDEO))
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or 795
    wanted = set(np.sort(rng.choice(total, size=n, replace=n > total)).tolist())
    frames, i = [], 0
    while len(frames) < n:
        ok, frame = cap.read()
        if not ok:
            break
        if i in wanted:
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        i += 1
    cap.release()
    return frames if len(frames) == n else []


def _drawn_person(rng: np.random.Generator, h: int, w: int) -> Any:
    from PIL import Image, ImageDraw, ImageFilter

    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(40, 220, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(30):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        d.rectangle(
            [x0, y0, x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 3))],
            fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
        )
    d.ellipse([w // 3, h // 12, 2 * w // 3, h // 4], fill=(200, 160, 130))  # head
    d.rectangle([w // 4, h // 4, 3 * w // 4, 2 * h // 3], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img.filter(ImageFilter.GaussianBlur(0.8))


# ---------------------------------------------------------------- throughput


class Timers:
    """Wraps module-level names of `pipeline.cache` to add up the time spent in each."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.seconds = dict.fromkeys(names, 0.0)
        self._orig: dict[str, Any] = {}

    def __enter__(self) -> Timers:
        for name in self.names:
            fn = getattr(cache_mod, name)
            self._orig[name] = fn

            def timed(*a: Any, _fn: Any = fn, _name: str = name, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **kw)
                finally:
                    self.seconds[_name] += time.perf_counter() - t0

            setattr(cache_mod, name, timed)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self._orig.items():
            setattr(cache_mod, name, fn)


def replayed_batches(store: Path, shard: int, cfg: CacheConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The v0 and Ic batches `cache_shard` fed the teacher, rebuilt from the written store."""
    reader = StoreReader(store, allow_incomplete=True)
    start, stop = reader.layout.shard_range(shard)
    params = reader.array(PARAMS)[start:stop]  # (rows, K, NUM_PARAMS)
    images = {i: decode_image(reader.image_bytes(i)) for i in range(start, stop)}
    jobs = [(r, k) for r in range(stop - start) for k in range(reader.layout.num_views)]
    out = []
    for i in range(0, len(jobs), cfg.batch_size):
        v0s, ics = [], []
        for r, k in jobs[i : i + cfg.batch_size]:
            p = params[r, k]
            v0, ic = replay(cfg.views, p, images[start + r], images[background_index(p)])
            v0s.append(v0)
            ics.append(ic)
        out.append((torch.stack(v0s), torch.stack(ics)))
    return out


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    t = os.times()
    return t.user + t.system


@torch.inference_mode()
def teacher_forward(teacher: Teacher, v0: torch.Tensor, ic: torch.Tensor) -> None:
    """The teacher's forward alone: v0 -> (g, patches), Ic -> relation logits (CPU, float32)."""
    g, patches = teacher.encode_global(v0)
    rel = teacher.relation_logits(ic)
    del g, patches, rel


def _run_cache(store: Path, cfg: CacheConfig, teacher: Teacher) -> tuple[float, float, dict[str, float]]:
    """One `cache_shard` of shard 0: (wall s, CPU s, wall s inside each wrapped name)."""
    with Timers(("replay", "teacher_targets", "write_shard")) as tm:
        c0, t0 = _cpu_seconds(), time.perf_counter()
        rep = cache_shard(store, 0, teacher, cfg, "cpu")
        dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    assert not rep.already_done and rep.num_skipped == 0
    return dt, cpu, dict(tm.seconds)


def _run_teacher(teacher: Teacher, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """The teacher forward over pre-replayed batches: (wall s, CPU s)."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for v0, ic in batches:
        teacher_forward(teacher, v0, ic)
    return time.perf_counter() - t0, _cpu_seconds() - c0


def bench_throughput(cfg: CacheConfig, teacher: Teacher, work: Path, reps: int) -> dict[str, Any]:
    """`cache_shard` against the teacher's forward on the same views, alternated, each on a fresh
    store; round 0 is a warm-up of both (allocator, oneDNN kernels, page cache) and replays the
    views that the teacher's runs are fed."""
    pairs = []
    parts: list[dict[str, float]] = []
    last: dict[str, Any] = {"batches": None, "round": 0}

    def run_cache() -> float:
        store = last["store"] = work / f"store-{last['round']}"
        shutil.rmtree(store, ignore_errors=True)
        layout = prepare_store(replace(cfg, out=str(store)), teacher)
        last["views"] = (layout.shard_range(0)[1] - layout.shard_range(0)[0]) * layout.num_views
        last["cache"] = _run_cache(store, cfg, teacher)
        if last["batches"] is None:
            last["batches"] = replayed_batches(store, 0, cfg)
        return last["cache"][0]

    def run_teacher() -> float:
        last["teacher"] = _run_teacher(teacher, last["batches"])
        return last["teacher"][0]

    def record(rep: int, _: dict[str, float]) -> None:
        shutil.rmtree(last["store"], ignore_errors=True)
        last["round"] = rep + 1
        if rep == 0:
            return
        (dt_cache, cpu_cache, tm), (dt_teacher, cpu_teacher) = last["cache"], last["teacher"]
        views = last["views"]
        pairs.append(
            {
                "cache_views_per_s": views / dt_cache,
                "teacher_views_per_s": views / dt_teacher,
                "ratio": dt_teacher / dt_cache,
                "cpu_time_ratio": cpu_teacher / cpu_cache,
                "loadavg_1min": os.getloadavg()[0],
            }
        )
        other = dt_cache - sum(tm.values())
        parts.append(
            {
                "teacher_targets": tm["teacher_targets"] / dt_cache,
                "replay": tm["replay"] / dt_cache,
                "write_shard": tm["write_shard"] / dt_cache,
                "read_decode_sample_other": other / dt_cache,
                "teacher_targets_minus_forward": (tm["teacher_targets"] - dt_teacher) / dt_cache,
            }
        )
        print(
            f"  rep {rep}: cache_shard {views / dt_cache:.3f} views/s, teacher forward "
            f"{views / dt_teacher:.3f} views/s, ratio {dt_teacher / dt_cache:.3f} "
            f"(CPU-time ratio {cpu_teacher / cpu_cache:.3f}, load {os.getloadavg()[0]:.2f})",
            flush=True,
        )

    alternate({"cache": run_cache, "teacher": run_teacher}, reps, 1, record)
    med = {k: statistics.median(p[k] for p in pairs) for k in pairs[0]}
    fractions = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    return {
        "views_per_rep": last["views"],
        "reps": pairs,
        "median": med,
        "fractions_of_cache_shard_time": fractions,
    }


# ---------------------------------------------------------------- replay threads


def bench_replay(cfg: CacheConfig, threads: int, reps: int) -> dict[str, Any]:
    """Views/s that `cache_shard`'s replay stage delivers with 1 thread and with `threads` threads.

    This is what one worker can feed a GPU teacher (on CPU the teacher's forward, not replay, sets
    the pace and one thread replays). The views are the corpus images' first `cfg.num_views` views,
    replayed through `pipeline.cache.batches_ahead` in batches of `cfg.batch_size`; the two thread counts
    alternate and every run's tensors are checked equal to the first's.
    """
    records = index_corpus(cfg.corpus)
    images = [decode_image(read_bytes(r.source)) for r in records]
    pool = [(i, (im.height, im.width)) for i, im in enumerate(images)]
    jobs = [
        (i, sample_view(cfg.views, cfg.seed, r.key, k, pool[i][1], [p for p in pool if p[0] != i]))
        for i, r in enumerate(records)
        for k in range(cfg.num_views)
    ]

    def one(job: tuple[int, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        i, p = job
        return replay(cfg.views, p, images[i], images[background_index(p)])

    ref = [v for _, vs in batches_ahead(jobs, cfg.batch_size, one, 1) for v in vs]

    def replay_with(n: int) -> Callable[[], float]:
        def run() -> float:
            t0 = time.perf_counter()
            got = [v for _, vs in batches_ahead(jobs, cfg.batch_size, one, n) for v in vs]
            dt = time.perf_counter() - t0
            assert all(
                torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref, got, strict=True)
            )
            return dt

        return run

    seconds = alternate({"one": replay_with(1), "many": replay_with(threads)}, reps)
    rates = {
        1: [len(jobs) / dt for dt in seconds["one"]],
        threads: [len(jobs) / dt for dt in seconds["many"]],
    }
    ratios = pair_ratios(rates[threads], rates[1])
    return {
        "views": len(jobs),
        "threads": threads,
        "views_per_s_1_thread": rates[1],
        f"views_per_s_{threads}_threads": rates[threads],
        "median_ratio": statistics.median(ratios),
        "loadavg_1min": os.getloadavg()[0],
    }


# ---------------------------------------------------------------- size and error


def _errors(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Errors of `got` against float32 `ref`, both (..., C); cosine per token (last axis)."""
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    err = np.abs(got64 - ref64)
    num = (ref64 * got64).sum(-1)
    den = np.linalg.norm(ref64, axis=-1) * np.linalg.norm(got64, axis=-1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
    return {
        "max_abs_err": float(err.max()),
        "max_abs_x": float(np.abs(ref64).max()),
        "max_abs_err_rel": float(err.max() / np.abs(ref64).max()),
        "min_token_cos": float(cos.min()),
    }


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_size_error(cfg: CacheConfig, teacher: Teacher, work: Path) -> dict[str, Any]:
    """Encode/decode one shard's float32 targets in every dtype; also through a real store per dtype."""
    # float32 targets of a whole shard from a real run of stage one
    ref_store = work / "store-float32-ref"
    shutil.rmtree(ref_store, ignore_errors=True)
    ref_cfg = replace(cfg, out=str(ref_store), dtype="float32")
    layout = prepare_store(ref_cfg, teacher)
    cache_shard(ref_store, 0, teacher, ref_cfg, "cpu")
    start, stop = layout.shard_range(0)
    reader = StoreReader(ref_store, allow_incomplete=True)
    feats = {name: reader.array(name)[start:stop] for name in FEATURES}  # float32 (rows, K, ...)
    params = reader.array(PARAMS)[start:stop]
    rows = stop - start
    num_views = rows * layout.num_views
    images = [
        (str(k), reader.image_bytes(start + r), "jpg") for r, k in enumerate(reader.meta("keys")[start:stop])
    ]
    out: dict[str, Any] = {"num_views": num_views}
    for dtype in DTYPES:
        res: dict[str, Any] = {}
        decoded = {}
        # int8-rotated: v0's targets through the store's R (its seed's), the relation as int8
        rotation = token_rotation(layout.embed_dim, cfg.seed) if dtype == "int8-rotated" else None
        for name in FEATURES:
            kind = "int8" if rotation is not None and name == RELATION else dtype
            stored, scale = encode(feats[name], kind, rotation)
            decoded[name] = decode(stored, scale, kind, rotation).numpy()
            res[name] = _errors(feats[name], decoded[name])
        a_ref = _softmax(feats[RELATION].astype(np.float64))  # (rows, K, T, T) teacher affinities
        a_got = _softmax(decoded[RELATION].astype(np.float64))
        kl = (a_ref * (np.log(a_ref) - np.log(a_got))).sum(-1)  # (rows, K, T) KL per row
        res[RELATION].update(
            softmax_max_abs_err=float(np.abs(a_got - a_ref).max()),
            row_kl_max=float(kl.max()),
            row_kl_mean=float(kl.mean()),
        )
        # the same targets through a real store of this dtype
        store = work / f"store-{dtype}"
        shutil.rmtree(store, ignore_errors=True)
        lay = prepare_store(replace(cfg, out=str(store), dtype=dtype), teacher)
        data = ShardData(
            shard=0, features=feats, params=params, valid=np.ones(rows, dtype=np.uint8), images=images
        )
        write_shard(store, data)
        r2 = StoreReader(store, allow_incomplete=True)
        same = True
        for k in range(lay.num_views):
            t = r2.read_targets(np.arange(start, stop), k)
            for name, got in ((GLOBAL, t.global_), (LOCAL, t.local), (RELATION, t.relation)):
                same &= bool(np.array_equal(got.numpy(), decoded[name][:, k]))
        feature_dirs = (
            [n for n in FEATURES]
            + ([n + SCALE_SUFFIX for n in FEATURES] if dtype in ("int8", "int8-rotated") else [])
            + ([TOKEN_ROTATION] if rotation is not None else [])
        )
        feat_bytes = sum(_dir_bytes(store / n) for n in feature_dirs) + _dir_bytes(store / PARAMS)
        res["store_read_equals_decode"] = same
        res["bytes_per_view_layout"] = lay.bytes_per_view()
        res["bytes_per_view_on_disk"] = feat_bytes / num_views
        res["image_bytes_per_view_on_disk"] = _dir_bytes(store / IMAGES_DIR) / num_views
        res["store_bytes_per_view_on_disk"] = (
            _dir_bytes(store) - _dir_bytes(store / MARKERS_DIR)
        ) / num_views
        out[dtype] = res
        shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(ref_store, ignore_errors=True)
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/dpal_bench", help="scratch folder (corpus and stores)")
    ap.add_argument("--images", type=int, default=16, help="images in the benchmarked shard")
    ap.add_argument("--views", type=int, default=2, help="K views per image")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--reps", type=int, default=3, help="timed (cache_shard, teacher) pairs after one warmup pair"
    )
    ap.add_argument("--skip", default="", help="comma list of sections to skip: throughput,size,replay")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    corpus, corpus_desc = make_corpus(work / f"corpus-{args.images}", args.images)
    cfg = CacheConfig(
        corpus=str(corpus),
        out="",
        teacher=TEACHER,
        random_init=True,
        num_views=args.views,
        dtype="float16",
        shard_size=args.images,
        batch_size=args.batch_size,
        shards="0:",
        device="cpu",
    )
    teacher = load_teacher(teacher_spec(cfg), device="cpu")
    sizes = [decode_image(read_bytes(r.source)).size for r in index_corpus(str(corpus))]
    print(f"corpus: {corpus_desc}; sizes (W x H) {min(sizes)}..{max(sizes)}")
    print(
        f"teacher {TEACHER} (random init, D={teacher.embed_dim}), views v0 {cfg.views.global_size} "
        f"Ic {cfg.views.crowd_size}, K={args.views}, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "corpus": corpus_desc,
        "teacher": TEACHER,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "views": args.views,
        "images": args.images,
    }
    with tempfile.TemporaryDirectory(dir=work, prefix="cache-") as tmp:
        if "throughput" not in skip:
            thr = result["throughput"] = bench_throughput(cfg, teacher, Path(tmp), args.reps)
            m, f = thr["median"], thr["fractions_of_cache_shard_time"]
            print(
                f"stage one / teacher forward: median ratio {m['ratio']:.3f}, CPU-time ratio "
                f"{m['cpu_time_ratio']:.3f} "
                f"({'meets' if m['ratio'] >= 0.85 else 'MISSES'} target >= 0.85)"
            )
            print("  share of cache_shard time: " + ", ".join(f"{k} {v:.1%}" for k, v in f.items()))
        if "size" not in skip:
            size = result["size_error"] = bench_size_error(cfg, teacher, Path(tmp))
            print(f"size and error over {size['num_views']} views (float32 reference):")
            for dtype in DTYPES:
                r = size[dtype]
                print(
                    f"  {dtype:8s} bytes/view layout {r['bytes_per_view_layout']:,} on disk "
                    f"{r['bytes_per_view_on_disk']:,.0f} (+ images {r['image_bytes_per_view_on_disk']:,.0f}); "
                    f"store read == decode: {r['store_read_equals_decode']}"
                )
                for name in FEATURES:
                    e = r[name]
                    extra = (
                        f", softmax max abs err {e['softmax_max_abs_err']:.2e}, row KL(fp32 || {dtype}) max "
                        f"{e['row_kl_max']:.2e} mean {e['row_kl_mean']:.2e}"
                        if name == RELATION
                        else ""
                    )
                    print(
                        f"    {name:8s} max abs err {e['max_abs_err']:.3e} (max|x| {e['max_abs_x']:.3g}, "
                        f"rel {e['max_abs_err_rel']:.2e}), min token cos {e['min_token_cos']:.6f}{extra}"
                    )
            worst_int8 = min(size["int8"][n]["min_token_cos"] for n in FEATURES)
            print(
                f"int8 min per-token cosine {worst_int8:.6f}: "
                f"{'meets' if worst_int8 >= 0.999 else 'MISSES'} target >= 0.999"
            )
    if "replay" not in skip:
        rp = result["replay"] = bench_replay(cfg, args.threads, args.reps)
        print(
            f"replay (what one worker feeds a GPU teacher): {rp['views']} views, 1 thread "
            f"{statistics.median(rp['views_per_s_1_thread']):.1f} views/s, {args.threads} threads "
            f"{statistics.median(rp[f'views_per_s_{args.threads}_threads']):.1f} views/s, median ratio "
            f"{rp['median_ratio']:.2f} (load {rp['loadavg_1min']:.2f})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
