"""Corpus: folders (recursive, by extension), .txt lists and WebDataset tar shards (keys from
__key__, random access by offset, brace patterns); decoding of every kind of bad or odd file."""

from __future__ import annotations

import io
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dpal.corpus import BadImage, decode_image, index_corpus, read_bytes


def _write_wds(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for key, fields in samples.items():
            sink.write({"__key__": key, **fields})


def test_folder_is_recursive_sorted_and_filtered(tmp_path: Path, corpus_files: dict[str, bytes]) -> None:
    for rel, data in corpus_files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "meta.json").write_text("{}")
    (tmp_path / "sub" / "deep").mkdir()
    (tmp_path / "sub" / "deep" / "UPPER.JPG").write_bytes(corpus_files["p00.jpg"])
    refs = index_corpus(str(tmp_path))
    keys = [r.key for r in refs]
    assert keys == sorted([*corpus_files, "sub/deep/UPPER.JPG"])
    assert len(keys) == 14 and sum(k.startswith("sub/") for k in keys) == 4
    for r in refs:
        assert Path(r.source).is_absolute() and r.offset == -1 and r.size == -1
        assert read_bytes(r.source) == (tmp_path / r.key).read_bytes()


def test_txt_list_resolves_relative_paths(tmp_path: Path, corpus_files: dict[str, bytes]) -> None:
    (tmp_path / "imgs").mkdir()
    names = sorted(n for n in corpus_files if "/" not in n)[:3]
    for n in names:
        (tmp_path / "imgs" / n).write_bytes(corpus_files[n])
    absolute = tmp_path / "imgs" / names[2]
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text(f"# comment\n../imgs/{names[0]}\n\n  ../imgs/{names[1]}  \n{absolute}\n")
    refs = index_corpus(str(lst))
    assert [r.key for r in refs] == [f"../imgs/{names[0]}", f"../imgs/{names[1]}", str(absolute)]
    assert [read_bytes(r.source) for r in refs] == [corpus_files[n] for n in names]


def test_tar_keys_offsets_and_brace_pattern(tmp_path: Path, corpus_files: dict[str, bytes]) -> None:
    items = sorted((k, v) for k, v in corpus_files.items())
    shards = [dict(items[:5]), dict(items[5:9])]
    expected: dict[str, bytes] = {}
    for s, part in enumerate(shards):
        samples = {}
        for rel, data in part.items():
            key = f"shard{s}/{Path(rel).stem}"
            samples[key] = {Path(rel).suffix[1:]: data, "cls": b"3"}
            expected[key] = data
        _write_wds(tmp_path / f"train-{s:03d}.tar", samples)
    refs = index_corpus(str(tmp_path / "train-{000..001}.tar"))
    assert [r.key for r in refs] == list(
        expected
    )  # tar order, shard by shard; the .cls members are not images
    assert {r.source for r in refs} == {str(tmp_path / "train-000.tar"), str(tmp_path / "train-001.tar")}
    for r in refs:
        assert r.offset > 0 and r.size == len(expected[r.key])
        assert read_bytes(r.source, r.offset, r.size) == expected[r.key]
    # keys are WebDataset's own __key__
    ds = wds.WebDataset(str(tmp_path / "train-{000..001}.tar"), shardshuffle=False, empty_check=False)
    assert [s["__key__"] for s in ds] == [r.key for r in refs]
    # a glob finds the same shards in the same order
    assert [r.key for r in index_corpus(str(tmp_path / "train-*.tar"))] == list(expected)


def test_plain_tarfile_and_refusals(tmp_path: Path, corpus_files: dict[str, bytes]) -> None:
    data = corpus_files["p00.jpg"]
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        for name, payload in (("x/one.jpg", data), ("x/one.txt", b"caption"), ("two.seg.png", data)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    refs = index_corpus(str(tmp_path / "a.tar"))
    assert [r.key for r in refs] == ["x/one"]  # "two.seg.png" has extension "seg.png": not an image field
    assert read_bytes(refs[0].source, refs[0].offset, refs[0].size) == data

    with tarfile.open(tmp_path / "b.tar.gz", "w:gz"):
        pass
    with pytest.raises(ValueError, match="compressed tars"):
        index_corpus(str(tmp_path / "b.tar.gz"))
    with pytest.raises(ValueError, match="duplicate keys"):
        index_corpus(str(tmp_path / "{a,a}.tar"))
    with pytest.raises(ValueError, match="not found"):
        index_corpus(str(tmp_path / "missing-{0..1}.tar"))
    with pytest.raises(ValueError, match="not found"):
        index_corpus(str(tmp_path / "no_such_folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        index_corpus(str(tmp_path / "empty"))


def test_decode_bad_files(bad_cases: dict[str, tuple[bytes, str]]) -> None:
    for name, (data, expected) in bad_cases.items():
        if expected == "rgb":
            continue
        with pytest.raises(BadImage) as e:
            decode_image(data)
        assert expected in e.value.reason, (name, e.value.reason)


def test_decode_converts_to_rgb_with_checked_pixels(bad_cases: dict[str, tuple[bytes, str]]) -> None:
    cmyk = decode_image(bad_cases["conv_cmyk.jpg"][0])
    assert cmyk.mode == "RGB" and cmyk.size == (24, 48)
    assert np.array_equal(
        np.asarray(cmyk), np.asarray(Image.open(io.BytesIO(bad_cases["conv_cmyk.jpg"][0])).convert("RGB"))
    )

    raw16 = Image.open(io.BytesIO(bad_cases["conv_gray16.png"][0]))
    assert raw16.mode.startswith("I")  # PIL keeps 16 bits
    g = np.asarray(decode_image(bad_cases["conv_gray16.png"][0]))
    v = np.asarray(raw16, dtype=np.float64)
    assert g.shape == (48, 24, 3) and g.dtype == np.uint8
    assert np.array_equal(g[..., 0], np.round(v / 257).astype(np.uint8))  # top 8 bits of 0..65535
    assert np.array_equal(g[..., 0], g[..., 2]) and v.max() > 255  # really 16-bit input

    rgba = np.asarray(Image.open(io.BytesIO(bad_cases["conv_rgba.png"][0])), dtype=np.float64)
    out = np.asarray(decode_image(bad_cases["conv_rgba.png"][0]), dtype=np.float64)
    # composited on black: rgb * alpha / 255 (PIL rounds in integers)
    assert out.shape == (48, 24, 3)
    assert np.abs(out - rgba[..., :3] * rgba[..., 3:] / 255).max() <= 1.0


def test_decode_applies_exif_orientation() -> None:
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, :5] = 255  # white band on the left
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=100)
    out = np.asarray(decode_image(buf.getvalue()))
    assert out.shape == (30, 10, 3)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the band is now on top


def test_bomb_headers_are_refused_quietly(bomb_header: Callable[[int, int], bytes]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape
        for w, h, needle in (
            (20000, 20000, "decompression bomb"),
            (10000, 10000, "100000000 pixels > max_pixels"),
            (9000, 9000, "81000000 pixels > max_pixels 64000000"),
        ):
            with pytest.raises(BadImage, match=needle):
                decode_image(bomb_header(w, h))
        with pytest.raises(BadImage, match="60 pixels > max_pixels 50"):
            decode_image(bomb_header(6, 10), max_pixels=50)


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 10, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _plain_tar(path: Path, n: int) -> list[int]:
    """A ustar of n PNGs s0.png ... (one 512-byte data block each); returns each header's offset."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(n):
            data = _png(20 * i)
            info = tarfile.TarInfo(f"s{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tf:
        return [m.offset for m in tf]


def test_corrupt_tar_header_loses_only_its_member_and_is_recorded(tmp_path: Path) -> None:
    from dpal.corpus import scan_corpus

    heads = _plain_tar(tmp_path / "good.tar", 5)
    assert heads == [0, 1024, 2048, 3072, 4096]  # header block + one data block per member
    data = bytearray((tmp_path / "good.tar").read_bytes())
    data[heads[2]] ^= 0xFF  # the first byte of s2's name: the header checksum no longer matches
    (tmp_path / "mid.tar").write_bytes(data)
    # tarfile alone ends the archive at the bad header: s3 and s4 would be lost silently
    with tarfile.open(tmp_path / "mid.tar") as tf:
        assert tf.getnames() == ["s0.png", "s1.png"]
    assert [r.key for r in index_corpus(str(tmp_path / "mid.tar"))] == ["s0", "s1", "s3", "s4"]
    assert scan_corpus(str(tmp_path / "mid.tar")).problems == [
        {
            "entry": f"{tmp_path / 'mid.tar'} at byte 2048",
            "reason": "corrupt tar header: 1024 bytes up to the next valid header (s3.png) were skipped; "
            "the member(s) there are lost",
        }
    ]
    data = bytearray((tmp_path / "good.tar").read_bytes())
    data[heads[4]] ^= 0xFF  # the last member's header
    (tmp_path / "last.tar").write_bytes(data)
    c = scan_corpus(str(tmp_path / "last.tar"))
    assert [r.key for r in c.refs] == ["s0", "s1", "s2", "s3"]
    assert len(c.problems) == 1 and c.problems[0]["entry"].endswith("last.tar at byte 4096")
    assert c.problems[0]["reason"].startswith("corrupt tar header: the 6144 bytes from here to the end")


def test_truncated_tar_names_the_cut_member(tmp_path: Path) -> None:
    from dpal.corpus import scan_corpus

    heads = _plain_tar(tmp_path / "good.tar", 5)
    data = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: heads[3] + 512 + 10])  # 10 bytes into s3's data
    c = scan_corpus(str(tmp_path / "cut.tar"))  # tarfile raised ReadError: unexpected end of data
    assert [r.key for r in c.refs] == ["s0", "s1", "s2"]
    assert c.problems == [
        {
            "entry": f"{tmp_path / 'cut.tar'}:s3.png",
            "reason": (
                f"the tar is cut short at byte {heads[3] + 522} inside this member (an interrupted copy or download?); "
                "the member is lost"
            ),
        }
    ]
    (tmp_path / "cut_header.tar").write_bytes(data[: heads[3] + 200])  # inside s3's header
    c = scan_corpus(str(tmp_path / "cut_header.tar"))
    assert [r.key for r in c.refs] == ["s0", "s1", "s2"] and len(c.problems) == 1
    assert c.problems[0]["reason"].startswith(
        f"the tar is cut short at byte {heads[3] + 200}, inside a header"
    )
    (tmp_path / "noise.tar").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"noise.tar is not a tar archive \(no valid header in 3000 bytes\)"):
        index_corpus(str(tmp_path / "noise.tar"))


def test_folder_entries_that_are_not_image_files_are_recorded(tmp_path: Path) -> None:
    import os

    from dpal.corpus import scan_corpus

    (tmp_path / "a.png").write_bytes(_png(10))
    (tmp_path / "z.png").write_bytes(_png(20))
    os.mkfifo(tmp_path / "fifo.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    os.symlink(tmp_path / "loop.jpg", tmp_path / "loop.jpg")
    os.symlink(tmp_path / "a.png", tmp_path / "link.png")  # a good link is an image like any other
    frames = [Image.fromarray(np.full((20, 10, 3), v, np.uint8)) for v in (0, 255)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as f:  # Latin-1 name
        f.write(_png(30))
    (tmp_path / "notes.txt").write_text("other files are still ignored")
    c = scan_corpus(str(tmp_path))
    assert [r.key for r in c.refs] == ["a.png", "link.png", "z.png"]
    assert c.refs[1].source == str(tmp_path / "a.png")
    reasons = {Path(p["entry"]).name: p["reason"] for p in c.problems}
    assert reasons == {
        "anim.gif": ".gif images are not read (animated or multi-page formats); convert to "
        ".jpg, .jpeg, .png, .webp, .bmp",
        "broken.jpg": f"broken symlink to {tmp_path / 'gone.jpg'}: No such file or directory",
        "caf\\xe9.jpg": "file name is not valid UTF-8 (store keys are UTF-8); rename it",
        "fifo.jpg": "a FIFO (named pipe), not a regular file",
        "loop.jpg": f"symlink loop to {tmp_path / 'loop.jpg'}: Too many levels of symbolic links",
    }


def test_non_utf8_names_in_tars_and_lists_are_named(tmp_path: Path) -> None:
    from dpal.corpus import scan_corpus

    with tarfile.open(
        tmp_path / "names.tar", "w", format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for name in ("ok.png", "caf\udce9.png"):  # the second name's bytes are Latin-1 b"caf\xe9.png"
            data = _png(50)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    c = scan_corpus(str(tmp_path / "names.tar"))
    assert [r.key for r in c.refs] == ["ok"]
    assert c.problems == [
        {
            "entry": f"{tmp_path / 'names.tar'}:caf\\xe9.png",
            "reason": "file name is not valid UTF-8 (store keys are UTF-8); rename it",
        }
    ]
    (tmp_path / "list.txt").write_bytes(b"ok.png\ncaf\xe9.png\n")
    with pytest.raises(
        ValueError, match=r"corpus list .*list.txt is not UTF-8 text \(line 2\); save it as UTF-8"
    ):
        index_corpus(str(tmp_path / "list.txt"))
