"""How many queries the sample ReID split should keep: measurements behind `--reid-stride`.

Give it a split written with every usable detection (stride 1):

    .venv/bin/python scripts/make_sample_corpus.py --out /tmp/sd1 --cache /tmp/hog.npz --reid-stride 1
    .venv/bin/python scripts/reid_stride_study.py /tmp/sd1/reid

For each stride s it takes, within each (person, pseudo-camera) walk, every s-th image starting at
each offset 0..s-1 (the s disjoint splits that `--reid-stride s` could have written; offset 0 is the
one it writes), scores them as make_sample_corpus.py lays them out (the same images as queries and
gallery, plus the distractors) and prints, averaged over offsets: queries, mAP and rank-1, how far
mAP and rank-1 move between offsets, the width of the 90% bootstrap interval over queries, and the
bytes of JPEG. Then, at stride 1, how alike neighbouring queries are: the correlation of per-query
AP between detections `lag` apart in one walk (each walk's mean removed) and the mean cosine
similarity of their features. Features: the EfficientNet-Lite2 teacher at 128x64 and 16x8
average-pooled pixels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dpal.evaluate import resolve_model
from dpal.reid import DISTRACTOR_PID, bootstrap_interval, extract_features, read_market, score_queries

STRIDES = (1, 2, 3, 4, 6)
LAGS = (1, 2, 3, 4, 6, 8, 12, 20)
SIZE = (128, 64)


def stride_rows(
    feats: np.ndarray, pids: np.ndarray, cams: np.ndarray, walks: list, dis: np.ndarray, sizes
) -> None:
    """Print one line per stride (see the module docstring)."""
    for s in STRIDES:
        rows = []
        for offset in range(s):
            sel = np.array(sorted(j for walk in walks for j in walk[offset::s]))
            gal = np.concatenate([sel, dis])
            sc = score_queries(feats[sel], feats[gal], pids[sel], cams[sel], pids[gal], cams[gal])
            lo, hi = bootstrap_interval(sc.ap)
            rlo, rhi = bootstrap_interval(sc.rank1)
            nbytes = 2 * sizes[sel].sum() + sizes[dis].sum()
            rows.append((len(sel), sc.ap.mean(), hi - lo, sc.rank1.mean(), rhi - rlo, nbytes))
        r = np.array(rows) * [1, 100, 100, 100, 100, 1e-6]
        spread = r[:, 1].max() - r[:, 1].min(), r[:, 3].max() - r[:, 3].min()
        print(
            f"  stride {s}: {r[:, 0].mean():5.0f} queries  mAP {r[:, 1].mean():4.1f} (offsets span "
            f"{spread[0]:.1f}, interval width {r[:, 2].mean():.1f})  R1 {r[:, 3].mean():4.1f} (span "
            f"{spread[1]:.1f}, width {r[:, 4].mean():.1f})  {r[:, 5].mean():.2f} MB"
        )


def neighbour_rows(
    feats: np.ndarray, pids: np.ndarray, cams: np.ndarray, walks: list, dis: np.ndarray
) -> None:
    """Print the within-walk AP correlation and feature cosine by lag, at stride 1."""
    idx = np.array(sorted(j for walk in walks for j in walk))
    gal = np.concatenate([idx, dis])
    sc = score_queries(feats[idx], feats[gal], pids[idx], cams[idx], pids[gal], cams[gal])
    ap = dict(zip(idx.tolist(), sc.ap, strict=True))
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    corr, cos = [], []
    for lag in LAGS:
        a, b, c = [], [], []
        for walk in walks:
            centred = np.array([ap[j] for j in walk]) - np.mean([ap[j] for j in walk])
            a += centred[:-lag].tolist()
            b += centred[lag:].tolist()
            c += [float(unit[walk[k]] @ unit[walk[k + lag]]) for k in range(len(walk) - lag)]
        corr.append(f"{lag}: {np.corrcoef(a, b)[0, 1]:.2f}")
        cos.append(f"{lag}: {np.mean(c):.2f}")
    print("  AP correlation by lag  " + ", ".join(corr))
    print("  feature cosine by lag  " + ", ".join(cos))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="a split written with --reid-stride 1 (its reid/ folder)")
    args = p.parse_args()
    torch.set_num_threads(1)
    split = read_market(args.data).gallery  # every query is also a gallery image
    pids, cams = split.pids, split.cams
    walks: dict[tuple[int, int], list[int]] = {}
    for i in np.nonzero(pids != DISTRACTOR_PID)[0]:  # names sort by pid, camera, frame
        walks.setdefault((int(pids[i]), int(cams[i])), []).append(int(i))
    dis = np.nonzero(pids == DISTRACTOR_PID)[0]
    sizes = np.array([path.stat().st_size for path in split.paths])
    print(f"{sum(map(len, walks.values()))} usable detections in {len(walks)} walks, {len(dis)} distractors")
    teacher = resolve_model("efficientnet-lite2", SIZE)

    def pixels(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, (16, 8)).flatten(1)

    for name, fn in (("efficientnet-lite2 at 128x64", teacher.fn), ("16x8 pooled pixels", pixels)):
        feats = extract_features(fn, split.paths, SIZE).numpy()
        print(name)
        stride_rows(feats, pids, cams, list(walks.values()), dis, sizes)
        neighbour_rows(feats, pids, cams, list(walks.values()), dis)


if __name__ == "__main__":
    main()
