"""Cut the sample corpus and the sample ReID split in sample_data/ from OpenCV's vtest.avi.

The video (one fixed camera, 795 frames, 10 fps) is cut in time. People in the first 60% of the
frames become the distillation corpus (sample_data/corpus/, one folder of person crops); people in
the held-out rest become a small Market-1501-style ReID split (sample_data/reid/query/ and
sample_data/reid/bounding_box_test/). People are found with OpenCV's built-in HOG people detector
and linked into tracks by box IoU with a colour-histogram gate, so that a track does not jump to a
person it crosses; broken tracks are stitched, and held-out tracks of one person who comes back
are joined into one identity. Only crops that no other detection covers are written. Because the
video has one camera, each held-out person gets two pseudo-cameras by time (c1 for the first half
of their frames, c2 for the second). Every few usable detections of each half go to both query/
and bounding_box_test/; Market's rule that drops gallery images of the query's person seen by the
query's camera leaves a c1 query's c2 images as its true matches, and the other way round. Scene
background cut where people walk, at person scale, is the distractor set (pid 0000). The output
is deterministic for a given video and seed.

Run from the repository root (about 6 minutes on two CPU cores, almost all of it HOG):

    .venv/bin/python scripts/make_sample_corpus.py --contact-sheets /tmp/sheets
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import shutil
import textwrap
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import cv2
import numpy as np

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = REPO_ROOT.parent / "shared" / "data" / "vtest.avi"
CACHE_VERSION = 2
APPEARANCE_STRIPES = ((0.12, 0.35), (0.35, 0.6), (0.6, 0.92))
OUTPUT_ENTRIES = {"corpus", "reid", "README.md"}
PLANE_MIN_SCORE = 1.0

# Boxes are float arrays (x0, y0, x1, y1) in the video's pixel coordinates.


@dataclass(frozen=True)
class DetectorConfig:
    """HOG people detector settings (OpenCV's default 64x128 people SVM)."""

    upscale: float = 1.5
    """Frames are enlarged by this factor first: HOG's window needs people about 100 px tall, and
    the people at the back of the courtyard are about 60 px tall."""
    win_stride: int = 8
    """Window step in pixels of the enlarged frame."""
    padding: int = 8
    """Border added around the frame by detectMultiScale, in pixels of the enlarged frame."""
    scale: float = 1.05
    """Pyramid step between detection scales."""
    hit_threshold: float = 0.0
    """SVM margin below which a window is not a hit at all."""


@dataclass(frozen=True)
class TrackConfig:
    """Detection filtering, IoU tracking and track stitching settings."""

    min_score: float = 0.6
    """HOG weight (SVM margin) below which a detection is dropped."""
    nms_iou: float = 0.3
    """Non-max suppression IoU."""
    min_aspect: float = 0.45
    """Drop boxes narrower than this times their height: OpenCV clips boxes at the frame edge."""
    size_tolerance: float = 0.3
    """Drop a detection whose height differs by more than this fraction from the height that the
    ground-plane fit (height against foot row) predicts."""
    match_iou: float = 0.3
    """Least IoU between a track's predicted box and a detection to link them."""
    max_link_dist: float = 0.42
    """Greatest appearance distance between a detection and a track's last 5 detections."""
    max_missed: int = 4
    """A track ends after this many frames without a detection."""
    stitch_gap: int = 25
    """Most frames between the end of one track and the start of another for them to be stitched."""
    min_stitch_len: int = 3
    """Tracks with fewer detections are too short to judge by appearance and are not stitched."""
    stitch_radius: float = 0.25
    """Greatest distance, in box heights, from where the ending track was heading to where the next
    one starts, for a gap of one frame..."""
    stitch_radius_per_frame: float = 0.02
    """...plus this much per frame of gap."""
    max_stitch_dist: float = 0.4
    """Greatest appearance distance between the end of one track and the start of the next."""
    min_track_len: int = 20
    """Tracks with fewer detections are dropped."""
    min_motion: float = 15.0
    """Tracks whose box centre never moves more than this many pixels are static false positives."""
    merge_dist: float = 0.38
    """Held-out tracks that never share a frame and are this similar are one person (see
    `merge_identities`)."""
    max_overlap: float = 0.2
    """A detection with more than this fraction of its box covered by another detection is not
    written out (two people in one crop)."""


@dataclass
class Track:
    """A person followed through the video.

    Attributes:
        track_id: 1-based id, in order of first frame.
        frames: video frame index of each detection, increasing.
        boxes: (x0, y0, x1, y1) of each detection.
        feats: (3, 128) appearance descriptor of each detection (see `describe`).
    """

    track_id: int
    frames: list[int] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    feats: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.frames)

    def add(self, frame: int, box: np.ndarray, feat: np.ndarray) -> None:
        """Append a detection."""
        self.frames.append(frame)
        self.boxes.append(box)
        self.feats.append(feat)

    def appearance(self, n: int) -> np.ndarray:
        """Mean descriptor of the first n (n > 0) or last -n (n < 0) detections."""
        feats = self.feats[:n] if n > 0 else self.feats[n:]
        return np.mean(feats, axis=0)

    def predict(self, frame: int) -> np.ndarray:
        """The last box moved by the mean velocity over the last (up to) 5 detections."""
        last = self.boxes[-1]
        if len(self) < 3:
            return last
        k = max(len(self) - 5, 0)
        velocity = (last - self.boxes[k]) / (self.frames[-1] - self.frames[k])
        return last + velocity * (frame - self.frames[-1])


def read_frames(video: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, BGR frame) for frames start <= index < stop of a video."""
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise ValueError(f"--video: cannot open {video}")
    try:
        index = 0
        while stop is None or index < stop:
            ok, frame = cap.read()
            if not ok:
                break
            if index >= start:
                yield index, frame
            index += 1
    finally:
        cap.release()


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) boxes -> (N, M)."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-max suppression; returns kept indices, best score first.

    Ties are broken by position so the result does not depend on the detector's output order
    (which varies with its thread scheduling).
    """
    order = np.lexsort((boxes[:, 1], boxes[:, 0], -scores))
    keep: list[int] = []
    for i in order:
        if not keep or box_iou(boxes[i : i + 1], boxes[keep]).max() <= iou:
            keep.append(int(i))
    return np.asarray(keep, dtype=np.int64)


def detect_frame(frame: np.ndarray, cfg: DetectorConfig) -> tuple[np.ndarray, np.ndarray]:
    """HOG people windows of one BGR frame.

    Returns:
        boxes (N, 4) in frame pixels and scores (N,), before any filtering, best score first
        (ties by position, so the order does not depend on how OpenCV ordered them).
    """
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    big = cv2.resize(frame, None, fx=cfg.upscale, fy=cfg.upscale, interpolation=cv2.INTER_LINEAR)
    rects, weights = hog.detectMultiScale(
        big,
        hitThreshold=cfg.hit_threshold,
        winStride=(cfg.win_stride, cfg.win_stride),
        padding=(cfg.padding, cfg.padding),
        scale=cfg.scale,
        groupThreshold=0,  # raw scored windows; filter_detections keeps one box per person
    )
    rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4) / cfg.upscale
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    scores = np.asarray(weights, dtype=np.float64).reshape(-1)
    order = np.lexsort((boxes[:, 1], boxes[:, 0], -scores))
    return boxes[order], scores[order]


def _single_threaded_opencv() -> None:
    cv2.setNumThreads(1)


def detect_video(video: Path, cfg: DetectorConfig, workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`detect_frame` on every frame, each on one OpenCV thread, frames spread over processes.

    With several OpenCV threads, detectMultiScale sometimes pairs scores with the wrong boxes:
    two runs on a busy machine returned the same boxes and the same scores for one frame in 795,
    paired differently. One thread per call makes the result exact and repeatable; `workers`
    processes keep the speed.

    Returns:
        Per frame, (boxes (N, 4), scores (N,)).
    """
    frames = (frame for _, frame in read_frames(video))
    out = []
    if workers <= 1:
        previous = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            results = (detect_frame(frame, cfg) for frame in frames)
            for index, result in enumerate(results):
                out.append(result)
                if index % 100 == 0:
                    logger.info("detected frame %d", index)
        finally:
            cv2.setNumThreads(previous)
        return out
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_single_threaded_opencv) as pool:
        for index, result in enumerate(pool.imap(partial(detect_frame, cfg=cfg), frames, chunksize=4)):
            out.append(result)
            if index % 100 == 0:
                logger.info("detected frame %d", index)
    return out


def load_or_detect(
    video: Path, cfg: DetectorConfig, cache: Path | None, workers: int = 1
) -> list[tuple[np.ndarray, np.ndarray]]:
    """detect_video, read from / written to an .npz cache keyed by the detector settings."""
    key = json.dumps({"version": CACHE_VERSION, "video": video.name, **asdict(cfg)}, sort_keys=True)
    if cache is not None and cache.exists():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                counts = z["counts"]
                splits = np.cumsum(counts)[:-1]
                boxes = np.split(z["boxes"], splits)
                scores = np.split(z["scores"], splits)
                logger.info("loaded detections from %s", cache)
                return list(zip(boxes, scores, strict=True))
    dets = detect_video(video, cfg, workers)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            cache,
            key=np.asarray(key),
            counts=np.asarray([len(s) for _, s in dets]),
            boxes=np.concatenate([b for b, _ in dets]).reshape(-1, 4),
            scores=np.concatenate([s for _, s in dets]),
        )
    return dets


def fit_ground_plane(dets: list[tuple[np.ndarray, np.ndarray]], min_score: float) -> np.ndarray:
    """Fit box height as a line in the foot row (the camera looks down on a flat courtyard).

    Two rounds of least squares on confident detections (score at least `min_score`); the second
    drops the 20% worst residuals of the first, which are mostly false positives (poles, signs,
    the van) and boxes around groups.

    Returns:
        (slope, intercept) with height ~= slope * y1 + intercept.
    """
    boxes = np.concatenate([b[s >= min_score] for b, s in dets])
    foot, height = boxes[:, 3], boxes[:, 3] - boxes[:, 1]
    coef = np.polyfit(foot, height, 1)
    resid = np.abs(height - np.polyval(coef, foot)) / height
    inlier = resid <= np.quantile(resid, 0.8)
    return np.polyfit(foot[inlier], height[inlier], 1)


def filter_detections(
    dets: list[tuple[np.ndarray, np.ndarray]], cfg: TrackConfig, plane: np.ndarray
) -> list[np.ndarray]:
    """Score threshold, size checks (ground plane, clipped at the edge), then NMS; boxes per frame."""
    out = []
    for boxes, scores in dets:
        height = boxes[:, 3] - boxes[:, 1]
        expected = np.polyval(plane, boxes[:, 3])
        ok = (scores >= cfg.min_score) & (np.abs(height - expected) <= cfg.size_tolerance * expected)
        ok &= boxes[:, 2] - boxes[:, 0] >= cfg.min_aspect * height
        boxes, scores = boxes[ok], scores[ok]
        out.append(boxes[nms(boxes, scores, cfg.nms_iou)] if len(boxes) else boxes)
    return out


def describe(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Appearance of a person box: an HSV histogram of each of three horizontal stripes.

    The stripes are the upper body, the hips and the legs (12-35%, 35-60% and 60-92% of the box
    height), each over the middle 40% of the box width so that grass and tarmac stay out. Each
    histogram has 8 hue x 4 saturation x 4 value bins and sums to one.

    Returns:
        (3, 128) histograms.
    """
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    fh, fw = frame.shape[:2]
    cx0, cx1 = int(max(x0 + 0.3 * w, 0)), int(min(x1 - 0.3 * w, fw))
    out = []
    for top, bottom in APPEARANCE_STRIPES:
        cy0, cy1 = int(max(y0 + top * h, 0)), int(min(y0 + bottom * h, fh))
        hsv = cv2.cvtColor(frame[cy0:cy1, cx0:cx1], cv2.COLOR_BGR2HSV)
        hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256]).reshape(-1)
        out.append(hist / max(float(hist.sum()), 1.0))
    return np.stack(out)


def appearance_dist(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over stripes of the Bhattacharyya distance of two (3, 128) descriptors (0 same, 1 disjoint).

    On this video, consecutive detections of one person are below 0.39 in 99% of cases and two
    people seen in the same frame are above 0.48 in 99% of cases.
    """
    coeff = np.sqrt(a * b).sum(-1)  # (3,)
    return float(np.sqrt(np.clip(1.0 - coeff, 0.0, None)).mean())


def describe_video(video: Path, boxes_per_frame: list[np.ndarray]) -> list[np.ndarray]:
    """`describe` for every box of every frame -> per frame an (N, 3, 128) array."""
    out = []
    for t, frame in read_frames(video, 0, len(boxes_per_frame)):
        feats = [describe(frame, b) for b in boxes_per_frame[t]]
        out.append(np.stack(feats) if feats else np.zeros((0, len(APPEARANCE_STRIPES), 128)))
    return out


def track_people(
    boxes_per_frame: list[np.ndarray],
    feats_per_frame: list[np.ndarray],
    start: int,
    stop: int,
    cfg: TrackConfig,
) -> list[Track]:
    """Greedy IoU tracking with an appearance gate over frames start <= t < stop.

    Each track's box is moved ahead by its recent velocity; each frame, (track, detection) pairs
    are linked in order of decreasing IoU with that prediction when the IoU is at least
    `match_iou` and the detection looks like the track's last few detections. An unlinked
    detection starts a track; a track unlinked for more than `max_missed` frames ends.

    Returns:
        All tracks (unfiltered), numbered by first frame.
    """
    active: list[Track] = []
    finished: list[Track] = []
    next_id = 1
    for t in range(start, stop):
        boxes, feats = boxes_per_frame[t], feats_per_frame[t]
        still = []
        for tr in active:
            (finished if t - tr.frames[-1] > cfg.max_missed + 1 else still).append(tr)
        active = still
        pairs = []
        if active and len(boxes):
            iou = box_iou(np.stack([tr.predict(t) for tr in active]), boxes)
            for i, j in zip(*np.nonzero(iou >= cfg.match_iou), strict=True):
                if appearance_dist(active[i].appearance(-5), feats[j]) <= cfg.max_link_dist:
                    pairs.append((-iou[i, j], int(i), int(j)))
        used_t, used_d = set(), set()
        for _, i, j in sorted(pairs):
            if i in used_t or j in used_d:
                continue
            used_t.add(i)
            used_d.add(j)
            active[i].add(t, boxes[j], feats[j])
        for j in range(len(boxes)):
            if j not in used_d:
                tr = Track(next_id)
                tr.add(t, boxes[j], feats[j])
                active.append(tr)
                next_id += 1
    return sorted(finished + active, key=lambda tr: (tr.frames[0], tr.track_id))


def stitch_tracks(tracks: list[Track], cfg: TrackConfig) -> list[Track]:
    """Join a track that ends to one that starts soon after, near where the first was heading.

    Candidates are pairs with a gap of 1 to `stitch_gap` frames, whose start box centre lies within
    `stitch_radius + stitch_radius_per_frame * gap` box heights of the first track's predicted
    centre, and whose descriptors
    (mean of the last / first 10 detections) are within `max_stitch_dist`. They are joined
    greedily, most similar first, each track at most once at each end.
    """
    cands = []
    for a in tracks:
        for b in tracks:
            gap = b.frames[0] - a.frames[-1]
            if a is b or not 1 <= gap <= cfg.stitch_gap or min(len(a), len(b)) < cfg.min_stitch_len:
                continue
            pa = a.predict(b.frames[0])
            ca, cb = (pa[:2] + pa[2:]) / 2, (b.boxes[0][:2] + b.boxes[0][2:]) / 2
            radius = (cfg.stitch_radius + cfg.stitch_radius_per_frame * gap) * (b.boxes[0][3] - b.boxes[0][1])
            if np.linalg.norm(ca - cb) > radius:
                continue
            d = appearance_dist(a.appearance(-10), b.appearance(10))
            if d <= cfg.max_stitch_dist:
                cands.append((d, a.track_id, b.track_id))
    by_id = {tr.track_id: tr for tr in tracks}
    nxt: dict[int, int] = {}
    prv: dict[int, int] = {}
    for _, ia, ib in sorted(cands):
        if ia in nxt or ib in prv:
            continue
        nxt[ia], prv[ib] = ib, ia
    merged = []
    for tr in tracks:
        if tr.track_id in prv:
            continue
        out = Track(tr.track_id, list(tr.frames), list(tr.boxes), list(tr.feats))
        cur = tr.track_id
        while cur in nxt:
            cur = nxt[cur]
            out.frames += by_id[cur].frames
            out.boxes += by_id[cur].boxes
            out.feats += by_id[cur].feats
        merged.append(out)
    return merged


def keep_tracks(tracks: list[Track], cfg: TrackConfig) -> list[Track]:
    """Drop short and static tracks and renumber the rest 1.. by first frame."""
    kept = []
    for tr in tracks:
        centres = np.stack([(b[:2] + b[2:]) / 2 for b in tr.boxes])
        motion = float(np.linalg.norm(centres - centres[0], axis=1).max())
        if len(tr) >= cfg.min_track_len and motion >= cfg.min_motion:
            kept.append(tr)
    kept.sort(key=lambda tr: (tr.frames[0], tr.track_id))
    return [Track(i + 1, tr.frames, tr.boxes, tr.feats) for i, tr in enumerate(kept)]


def merge_identities(tracks: list[Track], max_dist: float) -> list[Track]:
    """Join tracks of one person who left the view (or was missed) and came back.

    Complete-linkage clustering of whole tracks: two groups are joined, closest first, when no
    track of one overlaps a track of the other in time (one person is in one place at a time)
    and every pair of their tracks has mean descriptors within `max_dist`. On the held-out part
    of vtest.avi the joined pairs are below 0.34 and the closest pair of different people that
    never share a frame is at 0.47.

    Returns:
        One track per person, frames in time order, numbered 1.. by first frame.
    """
    means = [tr.appearance(len(tr)) for tr in tracks]
    spans = [(tr.frames[0], tr.frames[-1]) for tr in tracks]
    groups = [[i] for i in range(len(tracks))]
    while True:
        best = None
        for gi in range(len(groups)):
            for gj in range(gi + 1, len(groups)):
                pairs = [(a, b) for a in groups[gi] for b in groups[gj]]
                if any(spans[a][0] <= spans[b][1] and spans[b][0] <= spans[a][1] for a, b in pairs):
                    continue
                d = max(appearance_dist(means[a], means[b]) for a, b in pairs)
                if d <= max_dist and (best is None or d < best[0]):
                    best = (d, gi, gj)
        if best is None:
            break
        _, gi, gj = best
        groups[gi] += groups.pop(gj)
    merged = []
    for group in groups:
        members = sorted((tracks[i] for i in group), key=lambda tr: tr.frames[0])
        out = Track(members[0].track_id)
        for tr in members:
            out.frames += tr.frames
            out.boxes += tr.boxes
            out.feats += tr.feats
        merged.append(out)
    merged.sort(key=lambda tr: tr.frames[0])
    return [Track(i + 1, tr.frames, tr.boxes, tr.feats) for i, tr in enumerate(merged)]


def clear_of_others(tr: Track, boxes_per_frame: list[np.ndarray], max_overlap: float) -> list[bool]:
    """Per detection: True when no other detection covers more than `max_overlap` of its box."""
    out = []
    for f, box in zip(tr.frames, tr.boxes, strict=True):
        others = np.array([b for b in boxes_per_frame[f] if not np.array_equal(b, box)]).reshape(-1, 4)
        iw = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
        ih = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
        area = (box[2] - box[0]) * (box[3] - box[1])
        out.append(bool(len(others) == 0 or (iw * ih).max() / area <= max_overlap))
    return out


def crop_person(frame: np.ndarray, box: np.ndarray, pad: float, size: tuple[int, int]) -> np.ndarray:
    """Crop a box with `pad` context on each side, widened or heightened to the output aspect.

    Args:
        frame: BGR video frame.
        box: (x0, y0, x1, y1).
        pad: context added on each side as a fraction of the box's width and height.
        size: output (height, width).

    Returns:
        (height, width, 3) BGR crop; pixels outside the frame repeat the border.
    """
    out_h, out_w = size
    x0, y0, x1, y1 = box
    w, h = (x1 - x0) * (1 + 2 * pad), (y1 - y0) * (1 + 2 * pad)
    aspect = out_w / out_h
    if w / h > aspect:
        h = w / aspect
    else:
        w = h * aspect
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    patch = cv2.getRectSubPix(frame, (round(w), round(h)), centre)
    return cv2.resize(patch, (out_w, out_h), interpolation=cv2.INTER_AREA)


def even_pick(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), centred in k equal bins (all of them if k >= n)."""
    if k >= n:
        return list(range(n))
    return [int((i + 0.5) * n / k) for i in range(k)]


@dataclass(frozen=True)
class CropJob:
    """One crop to write: frame, box, destination file and contact-sheet label."""

    frame: int
    box: tuple[float, float, float, float]
    path: Path
    sheet: str
    label: str


def plan_corpus(
    tracks: list[Track], boxes_per_frame: list[np.ndarray], out: Path, stride: int, max_overlap: float
) -> list[CropJob]:
    """Every `stride`-th unoccluded detection of each track -> corpus/t{track:04d}_f{frame:06d}.jpg."""
    jobs = []
    for tr in tracks:
        clear = [k for k, ok in enumerate(clear_of_others(tr, boxes_per_frame, max_overlap)) if ok]
        for k in clear[::stride]:
            f = tr.frames[k]
            name = f"t{tr.track_id:04d}_f{f:06d}.jpg"
            jobs.append(CropJob(f, tuple(tr.boxes[k]), out / name, f"corpus_t{tr.track_id:04d}", "c"))
    return jobs


def plan_reid(
    tracks: list[Track],
    boxes_per_frame: list[np.ndarray],
    out: Path,
    stride: int,
    max_overlap: float,
) -> list[CropJob]:
    """Two pseudo-cameras per person, each queried against the other.

    A person's detections are split in time: the first half is camera c1, the second c2. Every
    `stride`-th unoccluded detection of each half is written twice, to query/ and to
    bounding_box_test/ under the same name. Market's rule drops gallery images of the query's person
    seen by the query's camera, so a c1 query's true matches are that person's c2 images and the
    other way round. A person with no usable detection in either half is left out.
    """
    jobs = []
    for tr in tracks:
        half = len(tr) // 2
        clear = [k for k, ok in enumerate(clear_of_others(tr, boxes_per_frame, max_overlap)) if ok]
        halves = {1: [k for k in clear if k < half], 2: [k for k in clear if k >= half]}
        if not halves[1] or not halves[2]:
            logger.info("identity %d left out: no unoccluded detection in one half", tr.track_id)
            continue
        for cam, picks in halves.items():
            for k in picks[::stride]:
                f = tr.frames[k]
                name = f"{tr.track_id:04d}_c{cam}s1_{f:06d}_00.jpg"
                for split in ("query", "bounding_box_test"):
                    jobs.append(
                        CropJob(f, tuple(tr.boxes[k]), out / split / name, f"heldout_t{tr.track_id:04d}", "q")
                    )
    return jobs


def plan_distractors(
    dets: list[tuple[np.ndarray, np.ndarray]],
    tracks: list[Track],
    start: int,
    stop: int,
    count: int,
    out: Path,
    seed: int,
) -> list[CropJob]:
    """Background crops (pid 0000): a held-out person's box, cut from a frame where nobody is there.

    A random box of a held-out track is placed in a random held-out frame; it is kept when it
    overlaps (IoU > 0) no tracked box and no raw HOG window with a positive score within 5 frames
    either side, so that people the tracker missed are not labelled as distractors. The crops show
    the pavement, lawn, posts and signs where people walk, at person scale.
    """
    rng = np.random.default_rng(seed)
    boxes_near: dict[int, list[np.ndarray]] = {}
    for tr in tracks:
        for f, b in zip(tr.frames, tr.boxes, strict=True):
            boxes_near.setdefault(f, []).append(b)
    for f in range(start, stop):
        boxes_near.setdefault(f, []).extend(dets[f][0][dets[f][1] > 0])
    pool = [b for tr in tracks for b in tr.boxes]
    jobs: list[CropJob] = []
    per_frame: dict[int, int] = {}
    for _ in range(1000 * count):
        if len(jobs) == count:
            break
        f = int(rng.integers(start, stop))
        box = pool[int(rng.integers(len(pool)))]
        near = [b for g in range(max(start, f - 5), min(stop, f + 6)) for b in boxes_near[g]]
        if near and box_iou(box[None], np.stack(near)).max() > 0:
            continue
        if any(box_iou(box[None], np.asarray(j.box)[None])[0, 0] > 0.3 for j in jobs):
            continue
        k = per_frame.get(f, 0)
        per_frame[f] = k + 1
        cam = 1 + len(jobs) % 2
        name = f"0000_c{cam}s1_{f:06d}_{k:02d}.jpg"
        jobs.append(CropJob(f, tuple(box), out / "bounding_box_test" / name, "distractors", "d"))
    return jobs


def write_crops(video: Path, jobs: list[CropJob], pad: float, size: tuple[int, int], quality: int) -> None:
    """Decode the video once and write every job's crop as a JPEG."""
    by_frame: dict[int, list[CropJob]] = {}
    for job in jobs:
        by_frame.setdefault(job.frame, []).append(job)
    last = max(by_frame) + 1 if by_frame else 0
    for t, frame in read_frames(video, 0, last):
        for job in by_frame.get(t, []):
            crop = crop_person(frame, np.asarray(job.box), pad, size)
            job.path.parent.mkdir(parents=True, exist_ok=True)
            ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if not ok:
                raise RuntimeError(f"JPEG encoding failed for {job.path}")
            job.path.write_bytes(buf.tobytes())


def write_contact_sheets(
    video: Path, parts: dict[str, list[Track]], jobs: list[CropJob], out: Path, pad: float, every: int = 2
) -> None:
    """PNGs for checking tracks by eye; none of this goes into the output folder.

    Writes `{part}_t{id:04d}.png` with every `every`-th detection of a track in time order (labels:
    frame, then q / g / c when that crop was written as query, gallery or corpus image), an index
    `{part}_index.png` with 8 evenly spaced crops per track, one row per track, to spot one person
    split over two ids, and `distractors.png`.
    """
    tile_h, tile_w = 128, 64
    written = {(j.sheet, j.frame): j.label for j in jobs}
    wanted: dict[int, list[tuple[str, int, np.ndarray]]] = {}
    for part, tracks in parts.items():
        for tr in tracks:
            name = f"{part}_t{tr.track_id:04d}"
            for k, (f, b) in enumerate(zip(tr.frames, tr.boxes, strict=True)):
                if k % every == 0 or (name, f) in written:
                    wanted.setdefault(f, []).append((name, f, b))
    for j in jobs:
        if j.sheet == "distractors":
            wanted.setdefault(j.frame, []).append(("distractors", j.frame, np.asarray(j.box)))
    crops: dict[str, list[tuple[int, np.ndarray]]] = {}
    for t, frame in read_frames(video, 0, max(wanted) + 1):
        for name, f, b in wanted.get(t, []):
            crops.setdefault(name, []).append((f, crop_person(frame, b, pad, (tile_h, tile_w))))

    def grid(tiles: list[tuple[str, np.ndarray]], cols: int) -> np.ndarray:
        rows = (len(tiles) + cols - 1) // cols
        sheet = np.full((rows * (tile_h + 14), min(cols, len(tiles)) * (tile_w + 2), 3), 255, np.uint8)
        for i, (label, img) in enumerate(tiles):
            r, c = divmod(i, cols)
            y, x = r * (tile_h + 14), c * (tile_w + 2)
            sheet[y : y + tile_h, x : x + tile_w] = img
            cv2.putText(sheet, label, (x + 1, y + tile_h + 11), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1)
        return sheet

    out.mkdir(parents=True, exist_ok=True)
    for name, tiles in crops.items():
        labelled = [(f"{f} {written.get((name, f), '')}", img) for f, img in tiles]
        cv2.imwrite(str(out / f"{name}.png"), grid(labelled, 16))
    for part, tracks in parts.items():
        rows = []
        for tr in tracks:
            tiles = crops[f"{part}_t{tr.track_id:04d}"]
            picks = even_pick(len(tiles), 8)
            rows += [(f"{tr.track_id}: {tiles[i][0]}", tiles[i][1]) for i in picks]
            rows += [("", np.full((tile_h, tile_w, 3), 255, np.uint8))] * (8 - len(picks))
        cv2.imwrite(str(out / f"{part}_index.png"), grid(rows, 8))


def write_overview(video: Path, parts: dict[str, list[Track]], every: int, out: Path) -> None:
    """Every `every`-th frame with each track's box and id drawn (held-out ids as h<id>), as PNG."""
    out.mkdir(parents=True, exist_ok=True)
    boxes: dict[int, list[tuple[str, int, np.ndarray]]] = {}
    for part, tracks in parts.items():
        for tr in tracks:
            for f, b in zip(tr.frames, tr.boxes, strict=True):
                if f % every == 0:
                    tag = f"h{tr.track_id}" if part == "heldout" else str(tr.track_id)
                    boxes.setdefault(f, []).append((tag, tr.track_id, b))
    for t, frame in read_frames(video):
        if t % every:
            continue
        for tag, tid, b in boxes.get(t, []):
            x0, y0, x1, y1 = (int(v) for v in b)
            colour = tuple(int(c) for c in np.random.default_rng(tid).integers(60, 256, 3))
            cv2.rectangle(frame, (x0, y0), (x1, y1), colour, 2)
            cv2.putText(frame, tag, (x0, y0 - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.6, colour, 2)
        cv2.putText(frame, str(t), (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 255), 2)
        cv2.imwrite(str(out / f"frame_{t:06d}.png"), cv2.resize(frame, None, fx=0.75, fy=0.75))


def write_readme(out: Path, summary: dict[str, object], size: tuple[int, int]) -> None:
    """sample_data/README.md: what the folders hold, where they come from, the license."""
    split, last = summary["split_frame"], summary["frames"]
    paragraphs = [
        "Written by `scripts/make_sample_corpus.py` from OpenCV's `vtest.avi` (one fixed camera, 795 "
        "frames, 768x576, 10 fps); docs/sample_data.md says how, and what was checked. Images are "
        f"{size[0]}x{size[1]} JPEGs of people found by OpenCV's HOG people detector and tracked by box "
        "IoU and colour. Frame numbers are 0-based video frames.",
        f"- `corpus/`: frames 0 to {split - 1}; {summary['corpus_crops']} crops of "
        f"{summary['corpus_tracks']} tracks, named `t{{track:04d}}_f{{frame:06d}}.jpg`.",
        f"- `reid/`: frames {split} to {last - 1}, Market-1501 layout and names "
        f"(`{{pid:04d}}_c{{cam}}s1_{{frame:06d}}_{{box:02d}}.jpg`), {summary['reid_identities']} people. "
        "The video has one camera, so each person's frames are split in time into two pseudo-cameras, "
        f"c1 (first half) and c2 (second half). One in {summary['reid_stride']} usable detections of "
        f"each half is both a query and a gallery image: `query/` has {summary['query_crops']} images "
        f"({summary['query_c1']} c1, {summary['query_c2']} c2), `bounding_box_test/` "
        f"{summary['gallery_crops']}, the same {summary['query_crops']} plus "
        f"{summary['distractors']} background crops with pid 0000 (distractors). Market's protocol "
        "drops gallery images of the query's person seen by the query's camera, so a c1 query is "
        "matched against the person's c2 images and a c2 query against the c1 images.",
        "Source: `vtest.avi` from OpenCV's samples (Debian package `opencv-doc` 4.6.0), under "
        "OpenCV's license as Debian records it for these files: Apache-2.0 and BSD-3-Clause.",
    ]
    wrapped = [
        textwrap.fill(p, 96, subsequent_indent="  " if p.startswith("- ") else "", break_on_hyphens=False)
        for p in paragraphs
    ]
    text = "# Sample data (generated; do not edit)\n\n" + "\n\n".join(wrapped) + "\n"
    (out / "README.md").write_text(text)


def dir_bytes(path: Path) -> int:
    """Total size of the files under a folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO, help="input video (default: %(default)s)")
    p.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT / "sample_data",
        help="output folder; its corpus/, reid/ and README.md are replaced",
    )
    p.add_argument("--split", type=float, default=0.6, help="fraction of frames that go to the corpus")
    p.add_argument("--corpus-stride", type=int, default=5, help="keep every n-th detection of a corpus track")
    p.add_argument(
        "--reid-stride",
        type=int,
        default=3,
        help="keep every n-th usable detection of each pseudo-camera of a held-out person, as query and "
        "as gallery image",
    )
    p.add_argument("--num-distractors", type=int, default=30, help="background gallery crops (pid 0000)")
    p.add_argument("--height", type=int, default=160, help="crop height; width is height / 2")
    p.add_argument(
        "--pad",
        type=float,
        default=0.0,
        help="context added around each HOG box, as a fraction of its size; the 64x128 HOG window already "
        "holds about 12%% of its height above and below the person",
    )
    p.add_argument("--quality", type=int, default=85, help="JPEG quality")
    p.add_argument("--seed", type=int, default=0, help="seed for the distractor boxes")
    p.add_argument("--workers", type=int, default=2, help="processes for the HOG detector")
    p.add_argument("--cache", type=Path, default=None, help="optional .npz cache of the raw HOG detections")
    p.add_argument("--contact-sheets", type=Path, default=None, help="write one PNG per track here")
    p.add_argument("--overview", type=Path, default=None, help="write full frames with track boxes here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Detect, track, split and write sample_data/; prints a summary."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    det_cfg, trk_cfg = DetectorConfig(), TrackConfig()
    video = args.video.resolve()
    if not video.is_file():
        raise ValueError(
            f"--video: {video} does not exist; docs/sample_data.md (Source and license) says where it comes from"
        )
    if args.reid_stride < 1:
        raise ValueError(f"--reid-stride must be at least 1, got {args.reid_stride}")
    out = args.out.resolve()
    if out.exists() and not {p.name for p in out.iterdir()} <= OUTPUT_ENTRIES:
        raise ValueError(f"--out: {out} holds files this script did not write; pick an empty or new folder")

    dets = load_or_detect(video, det_cfg, args.cache, args.workers)
    num_frames = len(dets)
    plane = fit_ground_plane(dets, PLANE_MIN_SCORE)
    boxes_per_frame = filter_detections(dets, trk_cfg, plane)
    feats_per_frame = describe_video(video, boxes_per_frame)
    split = int(round(args.split * num_frames))

    parts = {}
    for name, (start, stop) in {"corpus": (0, split), "heldout": (split, num_frames)}.items():
        raw = track_people(boxes_per_frame, feats_per_frame, start, stop, trk_cfg)
        stitched = stitch_tracks(raw, trk_cfg)
        kept = keep_tracks(stitched, trk_cfg)
        parts[name] = merge_identities(kept, trk_cfg.merge_dist) if name == "heldout" else kept
        logger.info(
            "%s frames %d-%d: %d raw tracks, %d after stitching, %d kept, %d identities",
            name,
            start,
            stop - 1,
            len(raw),
            len(stitched),
            len(kept),
            len(parts[name]),
        )

    for name in OUTPUT_ENTRIES:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    size = (args.height, args.height // 2)
    jobs = plan_corpus(
        parts["corpus"], boxes_per_frame, out / "corpus", args.corpus_stride, trk_cfg.max_overlap
    )
    jobs += plan_reid(
        parts["heldout"],
        boxes_per_frame,
        out / "reid",
        args.reid_stride,
        trk_cfg.max_overlap,
    )
    jobs += plan_distractors(
        dets, parts["heldout"], split, num_frames, args.num_distractors, out / "reid", args.seed
    )
    write_crops(video, jobs, args.pad, size, args.quality)
    if args.contact_sheets is not None:
        write_contact_sheets(video, parts, jobs, args.contact_sheets, args.pad)
    if args.overview is not None:
        write_overview(video, parts, 25, args.overview)

    summary: dict[str, object] = {
        "frames": num_frames,
        "split_frame": split,
        "ground_plane": [round(float(c), 4) for c in plane],
        "corpus_tracks": len(parts["corpus"]),
        "reid_identities": len(parts["heldout"]),
        "corpus_crops": len(list((out / "corpus").glob("*.jpg"))),
        "query_crops": len(list((out / "reid" / "query").glob("*.jpg"))),
        "gallery_crops": len(list((out / "reid" / "bounding_box_test").glob("*.jpg"))),
        "distractors": len(list((out / "reid" / "bounding_box_test").glob("0000_*.jpg"))),
        "reid_stride": args.reid_stride,
    }
    for cam in (1, 2):
        summary[f"query_c{cam}"] = len(list((out / "reid" / "query").glob(f"*_c{cam}s1_*.jpg")))
    write_readme(out, summary, size)
    summary["bytes"] = dir_bytes(out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
