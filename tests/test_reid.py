"""Tests for dpal.reid: Market-1501 parsing, hand-computed mAP / CMC, preprocessing, the table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from dpal import reid
from dpal.reid import (
    DISTRACTOR_PID,
    PairedDifference,
    bootstrap_interval,
    evaluate_ranking,
    extract_features,
    format_table,
    paired_bootstrap,
    read_market,
    score_queries,
)

SAMPLE_REID = Path(__file__).resolve().parents[1] / "sample_data" / "reid"


def unit(degrees: float, norm: float = 1.0) -> list[float]:
    """A 2-D vector at an angle; cosine similarity of two of them is cos(angle difference)."""
    rad = math.radians(degrees)
    return [norm * math.cos(rad), norm * math.sin(rad)]


def write_jpeg(path: Path, colour: tuple[int, int, int] = (120, 60, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 8), colour).save(path, quality=90)


def test_read_market_parses_pids_and_cameras(tmp_path: Path) -> None:
    for name in ("0001_c1s1_000100_00.jpg", "0002_c1s1_000120_00.jpg"):
        write_jpeg(tmp_path / "query" / name)
    for name in (
        "0002_c2s1_000220_00.jpg",
        "0001_c3s1_000200_00.jpg",
        "0000_c2s1_000310_01.jpg",  # distractor
        "-1_c2s1_000300_00.jpg",  # junk
    ):
        write_jpeg(tmp_path / "bounding_box_test" / name)
    (tmp_path / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")  # ignored

    split = read_market(tmp_path)

    assert [p.name for p in split.query.paths] == ["0001_c1s1_000100_00.jpg", "0002_c1s1_000120_00.jpg"]
    assert split.query.pids.tolist() == [1, 2]
    assert split.query.cams.tolist() == [1, 1]
    # sorted by name: "-" sorts before digits
    assert [p.name[:4] for p in split.gallery.paths] == ["-1_c", "0000", "0001", "0002"]
    assert split.gallery.pids.tolist() == [-1, 0, 1, 2]
    assert split.gallery.cams.tolist() == [2, 2, 3, 2]
    assert split.gallery.pids.dtype == np.int64 and split.gallery.cams.dtype == np.int64
    assert len(split.gallery) == 4
    assert all(p.is_file() for p in split.gallery.paths)


def test_read_market_rejects_bad_names_and_missing_folders(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "query" / "0001_c1s1_000100_00.jpg")
    with pytest.raises(ValueError, match="bounding_box_test"):
        read_market(tmp_path)
    write_jpeg(tmp_path / "bounding_box_test" / "0001_c2s1_000200_00.jpg")
    write_jpeg(tmp_path / "bounding_box_test" / "img_0001.jpg")
    with pytest.raises(ValueError, match="img_0001.jpg"):
        read_market(tmp_path)
    (tmp_path / "bounding_box_test" / "img_0001.jpg").unlink()
    write_jpeg(tmp_path / "bounding_box_test" / "12_c2s1_000200_00.jpg")  # pid must have 4 digits
    with pytest.raises(ValueError, match="12_c2s1_000200_00.jpg"):
        read_market(tmp_path)


def test_evaluate_ranking_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    # Gallery: pid, cam, angle, norm. Norms differ so that an unnormalised dot product ranks
    # differently (g3 would come first for q1).
    gallery = [
        (1, 1, 0, 1.0),  # g0: q1's pid seen by q1's camera -> removed for q1
        (-1, 2, 5, 1.0),  # g1: junk -> ignored
        (0, 2, 10, 0.1),  # g2: distractor, a negative ranked above q1's true matches
        (1, 2, 20, 3.0),  # g3
        (2, 2, 30, 1.0),  # g4
        (1, 2, 60, 1.0),  # g5
        (2, 1, 90, 1.0),  # g6: q2's pid seen by q2's camera -> removed for q2
        (3, 1, 120, 1.0),  # g7: q3's only image, same camera as q3
    ]
    queries = [(1, 1, 0), (2, 1, 33), (3, 1, 120)]
    # q1 (0 deg) by similarity: g0 g1 g2 g3 g4 g5 g6 g7; without g0, g1: g2 g3* g4 g5* g6 g7
    #   hits at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5; first hit at rank 2
    # q2 (33 deg), angle gaps g4 3, g3 13, g2 23, g5 27, g1 28, g0 33, g6 57, g7 87;
    #   without g1, g6: g4* g3 g2 g5 g0 g7 -> AP = 1/1 = 1.0; first hit at rank 1
    # q3: no true match once g7 is removed -> skipped
    # mAP = (0.5 + 1.0) / 2 = 0.75; rank1 = 1/2; rank5 = rank10 = 2/2
    q_feats = torch.tensor([unit(a) for _, _, a in queries])
    g_feats = torch.tensor([unit(a, n) for _, _, a, n in gallery])
    q_pids = np.array([p for p, _, _ in queries])
    q_cams = np.array([c for _, c, _ in queries])
    g_pids = np.array([p for p, _, _, _ in gallery])
    g_cams = np.array([c for _, c, _, _ in gallery])

    res = evaluate_ranking(q_feats, g_feats, q_pids, q_cams, g_pids, g_cams)

    assert res["mAP"] == pytest.approx(0.75, abs=1e-12)
    assert res["rank1"] == pytest.approx(0.5, abs=1e-12)
    assert res["rank5"] == pytest.approx(1.0, abs=1e-12)
    assert res["rank10"] == pytest.approx(1.0, abs=1e-12)
    assert res["num_valid_queries"] == 2
    assert res["num_skipped_queries"] == 1
    # queries are ranked a chunk at a time; chunks of 2 split these 3 queries over two chunks
    monkeypatch.setattr(reid, "RANK_CHUNK", 2)
    assert evaluate_ranking(q_feats, g_feats, q_pids, q_cams, g_pids, g_cams) == res

    # the same values per query: q1 and q2 are valid (positions 0 and 1), q3 is left out
    scores = score_queries(q_feats, g_feats, q_pids, q_cams, g_pids, g_cams, max_rank=5)
    assert scores.index.tolist() == [0, 1] and scores.num_queries == 3
    assert scores.ap.tolist() == pytest.approx([0.5, 1.0], abs=1e-12)
    assert scores.rank1.tolist() == [0.0, 1.0]
    # q1's first hit is at rank 2, q2's at rank 1
    assert scores.cmc.tolist() == [[False, True, True, True, True], [True] * 5]

    # q1 alone, with max_rank 1: only rank1 is reported
    only_q1 = evaluate_ranking(q_feats[:1], g_feats, q_pids[:1], q_cams[:1], g_pids, g_cams, max_rank=1)
    assert only_q1 == {
        "mAP": pytest.approx(0.5),
        "rank1": 0.0,
        "num_valid_queries": 1,
        "num_skipped_queries": 0,
    }


def test_average_precision_cumsum_formulation() -> None:
    # Gallery at 0, 10, ..., 60 deg, all camera 2; the query at -5 deg ranks them in index order.
    # Hits (pid 1) at ranks 1, 3, 6: AP = (1/1 + 2/3 + 3/6) / 3 = 13/18
    g_pids = np.array([1, 2, 1, 2, 2, 1, 2])
    g_feats = np.array([unit(10 * i) for i in range(7)])
    res = evaluate_ranking(
        np.array([unit(-5)]), g_feats, np.array([1]), np.array([1]), g_pids, np.full(7, 2), max_rank=5
    )
    assert res["mAP"] == pytest.approx(13 / 18, abs=1e-12)
    assert res["rank1"] == 1.0 and res["rank5"] == 1.0
    assert "rank10" not in res


def test_equal_similarities_keep_gallery_order() -> None:
    # Two identical gallery features: the first (a negative) ranks first -> hit at rank 2, AP 1/2
    res = evaluate_ranking(
        np.array([unit(0)]),
        np.array([unit(40), unit(40)]),
        np.array([5]),
        np.array([1]),
        np.array([6, 5]),
        np.array([2, 2]),
    )
    assert res["mAP"] == pytest.approx(0.5, abs=1e-12)
    assert res["rank1"] == 0.0


def test_evaluate_ranking_rejects_bad_input() -> None:
    feats = np.array([unit(0)])
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_ranking(feats, feats, np.array([1]), np.array([1]), np.array([1]), np.array([1]))
    with pytest.raises(ValueError, match="features"):
        evaluate_ranking(feats, np.ones((1, 3)), np.array([1]), np.array([1]), np.array([1]), np.array([2]))
    with pytest.raises(ValueError, match="g_pids"):
        evaluate_ranking(feats, feats, np.array([1]), np.array([1]), np.array([1, 2]), np.array([2]))


def test_extract_features_preprocessing_and_batches(tmp_path: Path) -> None:
    # Solid colours survive PNG and a bilinear resize exactly, so the per-channel mean of the
    # model input is (value / 255 - mean) / std:
    #   (255, 0, 128): (1 - .485) / .229, (0 - .456) / .224, (128/255 - .406) / .225
    #   grey 51 (0.2) as "L", converted to RGB: (.2 - .485) / .229, (.2 - .456) / .224, (.2 - .406) / .225
    paths = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    Image.new("RGB", (6, 10), (255, 0, 128)).save(paths[0])
    Image.new("L", (7, 9), 51).save(paths[1])
    Image.new("RGB", (6, 10), (255, 0, 128)).save(paths[2])
    calls = []

    def embed(x: Tensor) -> Tensor:
        calls.append((tuple(x.shape), x.dtype, torch.is_inference_mode_enabled()))
        return x.mean(dim=(2, 3))  # (B, 3)

    feats = extract_features(embed, paths, image_size=(4, 2), batch_size=2)

    red = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    grey = [(0.2 - 0.485) / 0.229, (0.2 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    assert torch.allclose(feats, torch.tensor([red, grey, red]), atol=1e-5)
    assert feats.dtype == torch.float32
    assert calls == [((2, 3, 4, 2), torch.float32, True), ((1, 3, 4, 2), torch.float32, True)]
    with pytest.raises(ValueError, match="embed_fn"):
        extract_features(lambda x: x, paths, image_size=(4, 2))
    with pytest.raises(ValueError, match="no images"):
        extract_features(embed, [], image_size=(4, 2))


def test_format_table() -> None:
    rows = [
        {"model": "teacher", "mAP": 0.5, "rank1": 0.25, "rank5": 0.75, "rank10": 1.0},
        {"model": "student (random)", "mAP": 0.0123, "rank1": 0.0, "rank5": 0.125, "rank10": 0.5, "extra": 3},
    ]
    # name column as wide as the longest name (16), then 2 spaces and 6 characters per metric
    assert format_table(rows) == (
        "model                mAP      R1      R5     R10\n"
        "teacher             50.0    25.0    75.0   100.0\n"
        "student (random)     1.2     0.0    12.5    50.0"
    )
    with pytest.raises(ValueError, match="rank10"):
        format_table([{"model": "x", "mAP": 0.1, "rank1": 0.1, "rank5": 0.1}])
    # intervals: shown in the columns of the rows that have them, blank in the others
    with_ci = {**rows[0], "mAP_lo": 0.301, "mAP_hi": 0.372, "rank1_lo": 0.05, "rank1_hi": 1.0}
    assert format_table([with_ci, rows[1]]) == (
        "model                mAP                     R1                     R5     R10\n"
        "teacher             50.0 [30.1, 37.2]      25.0 [5.0, 100.0]      75.0   100.0\n"
        "student (random)     1.2                    0.0                   12.5    50.0"
    )
    # rows of `dpal eval reid --json` are in percent already, and say so
    pct = {"model": "m", "mAP": 50.0, "rank1": 25.0, "rank5": 75.0, "rank10": 100.0, "unit": "percent"}
    assert format_table([pct]) == format_table([{**rows[0], "model": "m"}])


def test_sample_reid_split_is_consistent() -> None:
    # The shipped split (scripts/make_sample_corpus.py): both pseudo-cameras query the other. Every
    # query is also a gallery image (dropped for it by Market's same-camera rule); the gallery adds
    # 30 distractors. Every person has images in both cameras, so every query has a true match, and
    # identity features (one-hot pid) must score perfectly.
    split = read_market(SAMPLE_REID)
    people = split.gallery.pids != DISTRACTOR_PID
    assert [p.name for p in split.query.paths] == [
        p.name for p, keep in zip(split.gallery.paths, people, strict=True) if keep
    ]
    assert int((~people).sum()) == 30
    assert set(split.query.cams.tolist()) == {1, 2}
    for pid in set(split.query.pids.tolist()):
        assert set(split.query.cams[split.query.pids == pid].tolist()) == {1, 2}
    onehot = np.eye(int(split.gallery.pids.max()) + 1)
    res = evaluate_ranking(
        onehot[split.query.pids],
        onehot[split.gallery.pids],
        split.query.pids,
        split.query.cams,
        split.gallery.pids,
        split.gallery.cams,
    )
    assert res["mAP"] == 1.0 and res["rank1"] == 1.0
    assert res["num_valid_queries"] == len(split.query)


def test_bootstrap_interval_by_hand() -> None:
    # a constant: every resample has the same mean
    assert bootstrap_interval([0.25] * 7) == (0.25, 0.25)
    # [0, 1]: a resample's mean is 0, 1/2 or 1 with probability 1/4, 1/2, 1/4; the 5% and 95%
    # quantiles fall inside the 25% at each end
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    # [0, 0, 0, 1]: 4 x mean ~ Binomial(4, 1/4): P(0) = .316, P(<= 1) = .738, P(<= 2) = .949, so at
    # level 0.8 the 10% quantile is 0 and the 90% quantile is 2/4
    assert bootstrap_interval([0.0, 0.0, 0.0, 1.0], level=0.8) == (0.0, 0.5)
    # 200 zeros and 200 ones: mean 0.5, standard error 0.5 / sqrt(400) = 0.025, so the 90% interval
    # is about 0.5 +- 1.645 x 0.025 = [0.459, 0.541]
    lo, hi = bootstrap_interval(np.tile([0.0, 1.0], 200))
    assert lo == pytest.approx(0.5 - 1.645 * 0.025, abs=0.004) and hi == pytest.approx(
        0.5 + 1.645 * 0.025, abs=0.004
    )
    # deterministic for a seed, and the seed matters
    values = np.linspace(0, 1, 30) ** 2
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    assert bootstrap_interval(values, seed=3) != bootstrap_interval(values, seed=4)
    assert bootstrap_interval(values, num_samples=500)[0] < values.mean() < bootstrap_interval(values)[1]
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval([1.0], level=1.0)
    with pytest.raises(ValueError, match="num_samples"):
        bootstrap_interval([1.0], num_samples=0)


def test_paired_bootstrap_by_hand() -> None:
    a = np.array([0.9, 0.2, 0.6, 0.4, 1.0])
    assert paired_bootstrap(a, a) == PairedDifference(0.0, 0.0, 0.0)
    # a constant shift: every resample's difference is that shift
    shifted = paired_bootstrap(a + 0.25, a)
    assert (
        shifted.mean == pytest.approx(0.25)
        and shifted.lo == pytest.approx(0.25)
        and shifted.hi == pytest.approx(0.25)
    )
    # differences [1, 0, 0, 0]: the mean is 1/4 and, as for bootstrap_interval([0, 0, 0, 1]), the
    # 80% interval is [0, 1/2]; two unpaired intervals would overlap however the queries fall
    assert paired_bootstrap([1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], level=0.8) == PairedDifference(
        0.25, 0.0, 0.5
    )
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap([1.0, 0.0], [1.0])
