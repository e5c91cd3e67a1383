"""Reading a store: its attributes, checked (`read_attrs`, `read_meta`), a rotated codec's R
(`read_token_rotation`), and `StoreReader`, stage two's (and `dpal store`'s) read-only access.

Readers refuse other schema versions, incomplete stores (unless asked) and missing chunks (they
raise, never read zeros); every value read is checked against the checksums its shard's marker
recorded (`integrity.py`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import torch
import zarr
from torch import Tensor

from dpal.corpus import read_bytes
from dpal.store.codecs import decode, target_codec
from dpal.store.integrity import (
    VALUE_CRC32C,
    crc32c_of,
    done_shards,
    index_crc32c,
    marker_path,
    metadata_problems,
    nonfinite_rows,
    read_marker,
    rewrite_hint,
    shard_name,
    shard_problems,
)
from dpal.store.layout import Layout
from dpal.store.meta import StoreMeta
from dpal.store.relation import RelationCode, check_relation_code, rebuild_logits
from dpal.store.rotation import read_token_rotation
from dpal.store.schema import (
    CHECKED_SHARD_ARRAYS,
    FACTOR_DTYPE,
    FEATURES,
    GLOBAL,
    IDENTITY_ATTRS,
    IMAGE_OFFSET,
    IMAGE_SIZE,
    IMAGES_DIR,
    INTEGRITY,
    KEYS,
    LOCAL,
    PARAMS,
    RELATION,
    RELATION_DIAG,
    RELATION_FACTOR,
    SCALE_SUFFIX,
    SOURCE,
    SOURCE_OFFSET,
    SOURCE_SIZE,
    VALID,
    StoreError,
    check_header,
)


def layout_of(attrs: dict[str, Any], where: str | Path = "store") -> Layout:
    """The shapes a store's attributes give (checked: `StoreMeta.from_attrs`)."""
    return StoreMeta.from_attrs(attrs, where).layout


def read_meta(path: Path) -> StoreMeta:
    """A store's attributes as a checked `StoreMeta` (`read_attrs`, then `StoreMeta.from_attrs`)."""
    return StoreMeta.from_attrs(read_attrs(path), path)


def read_attrs(path: Path) -> dict[str, Any]:
    """Group attributes of a store as raw JSON, after checking it is one this version reads and
    that its metadata (attributes, every array's zarr.json) is what was recorded when it was made.
    Code that uses the attributes reads `read_meta` (typed and checked) instead."""
    attrs = _load_attrs(path)
    problems = metadata_problems(path, attrs)
    if problems:
        raise StoreError(
            f"{path}: {problems[0]}{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; "
            "the store's metadata is damaged or edited and its data cannot be trusted: restore it "
            "from a copy, or rebuild it with `dpal cache-teacher --out NEW`"
        )
    return attrs


def _load_attrs(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path} is not a dpal store (no zarr.json); create one with `dpal cache-teacher`")
    try:
        attrs = zarr.open_group(path, mode="r").attrs.asdict()
    except Exception as e:  # noqa: BLE001 - JSON or Zarr metadata errors: the file is damaged
        raise StoreError(
            f"{path / 'zarr.json'}: the store's attributes cannot be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); they describe every shard: restore the "
            "store from a copy, or rebuild it with `dpal cache-teacher --out NEW`"
        ) from None
    check_header(attrs, path)
    return attrs


@dataclass
class Targets:
    """Teacher targets of one batch, decoded to float32 (in the stored dtype when read raw)."""

    global_: Tensor | None  # (B, D); None: not asked for (read_targets' `targets`), as local, relation
    local: Tensor | None  # (B, P, D)
    relation: Tensor | None  # (B, T, T) row-shifted logits; read raw from a factor store: Z (B, T, r) float16
    params: np.ndarray  # (B, NUM_PARAMS)
    # int8 read raw: float32 (B,), (B, P), (B, T) (None for a factor store's relation, or not read)
    scales: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None
    relation_diag: Tensor | None = None  # a factor store read raw: (B, T) float32


def _feature_of(array: str) -> str:
    """The FEATURES name an array stores: a factor store's relation is two arrays."""
    return RELATION if array in (RELATION_FACTOR, RELATION_DIAG) else array


class StoreReader:
    """Read-only access to a store for stage two, `dpal store info` and `verify`.

    Missing chunks raise (`read_missing_chunks=False`): a lost shard file is never read as zeros.
    Nothing damaged is returned: the per-shard arrays (`valid`, image offsets and sizes, view
    parameters) are checked against the crc32c in each shard's marker, every image's bytes against
    its own crc32c, and a mismatch raises a StoreError that names the shard and what to run.
    """

    def __init__(self, path: str | Path, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        self.attrs = read_attrs(self.path)  # raw JSON; code reads `store_meta`, typed and checked
        self.store_meta = StoreMeta.from_attrs(self.attrs, self.path)
        self.layout = self.store_meta.layout
        if not self.store_meta.complete and not allow_incomplete:
            done = len(done_shards(self.path))
            raise StoreError(
                f"{self.path} is incomplete ({done}/{self.layout.num_shards} shards done); finish it by "
                "rerunning the same `dpal cache-teacher` command, or pass --allow-incomplete"
            )
        if self.store_meta.complete and not allow_incomplete:
            missing = sorted(set(range(self.layout.num_shards)) - done_shards(self.path))
            if missing:  # a marker deleted to rewrite its shard: the rows must not be read meanwhile
                raise StoreError(
                    f"{self.path} is marked complete but shard(s) {', '.join(map(shard_name, missing))} "
                    "have no marker; rerun the same `dpal cache-teacher` command to rewrite them, or "
                    "pass --allow-incomplete"
                )
        self.dtype = self.store_meta.dtype
        # R of an int8-rotated store, read and checked once, on open (None otherwise)
        self.rotation = (
            read_token_rotation(self.path, self.attrs, self.layout.embed_dim) if self.layout.rotated else None
        )
        self._arrays: dict[str, zarr.Array] = {}
        self._meta: dict[str, np.ndarray] = {}
        self._markers: dict[int, dict[str, Any]] | None = None
        self._image_crc: np.ndarray | None = None
        self._params_checked: set[int] = set()
        self._value_crc: dict[tuple[int, str], np.ndarray | None] = {}

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                self._arrays[name] = zarr.open_array(
                    self.path / name, mode="r", config={"read_missing_chunks": False}
                )
            except Exception as e:  # noqa: BLE001 - a missing or damaged zarr.json
                raise StoreError(
                    f"{self.path / name / 'zarr.json'}: array {name!r} cannot be opened ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); it holds every shard's rows: restore the store "
                    "from a copy, or rebuild it with `dpal cache-teacher --out NEW`"
                ) from None
        return self._arrays[name]

    def markers(self) -> dict[int, dict[str, Any]]:
        """Every finished shard's marker, read once (the set of finished shards is fixed at the
        first call: shards finished later are not used by this reader)."""
        if self._markers is None:
            done = sorted(done_shards(self.path) & set(range(self.layout.num_shards)))
            self._markers = {s: read_marker(self.path, s) for s in done}
        return self._markers

    def _recorded_crc(self, shard: int, name: str) -> int | None:
        """The crc32c that shard's marker records for array `name`; None in a schema-1 marker."""
        m = self.markers()[shard]
        if "crc32c" not in m:
            if self.store_meta.schema_version >= 2:
                raise StoreError(
                    f"{marker_path(self.path, shard)}: the marker of shard {shard_name(shard)} has "
                    f"no checksums (damaged or edited); {rewrite_hint(self.path, [shard])}"
                )
            return None
        return m["crc32c"][name]

    def _check_rows(self, name: str, shard: int, rows: np.ndarray) -> None:
        want = self._recorded_crc(shard, name)
        if want is not None and crc32c_of(rows) != want:
            raise StoreError(
                f"{self.path}: the {name!r} rows of shard {shard_name(shard)} do not match the checksum "
                f"its marker recorded (damaged or edited after stage one); "
                f"{rewrite_hint(self.path, [shard])}"
            )

    def meta(self, name: str) -> np.ndarray:
        """A whole small per-image array (valid, keys, sources, offsets), cached.

        Rows of unfinished shards read as the fill value (valid = 0, offsets -1), even where a
        killed writer left data; rows of finished shards are checked against their markers.
        """
        if name not in self._meta:
            if self.store_meta.complete:
                arr = self.array(name)
            else:
                arr = zarr.open_array(self.path / name, mode="r", config={"read_missing_chunks": True})
            try:
                values = arr[:]
            except Exception as e:  # noqa: BLE001 - a missing chunk, or a codec failing on damaged bytes
                raise self._unreadable(name, arr, e) from None
            recorded = self.attrs.get(INTEGRITY, {}).get("index_crc32c", {})
            if name in recorded and index_crc32c(values) != recorded[name]:
                raise StoreError(
                    f"{self.path}: the {name!r} array does not match the checksum recorded when the "
                    "store was created (damaged or edited); restore the store from a copy, or rebuild "
                    "it with `dpal cache-teacher --out NEW`"
                )
            if name in CHECKED_SHARD_ARRAYS:
                markers = self.markers()
                for s in range(self.layout.num_shards):
                    a, b = self.layout.shard_range(s)
                    if s in markers:
                        self._check_rows(name, s, values[a:b])
                    else:
                        values[a:b] = self.array(name).fill_value
            self._meta[name] = values
        return self._meta[name]

    def _unreadable(self, name: str, arr: zarr.Array, error: Exception) -> StoreError:
        """The error for a whole-array read that failed: names the shard(s) whose chunk fails."""
        bad = []
        for s in range(self.layout.num_shards):
            a, b = self.layout.shard_range(s)
            try:
                arr[a:b]
            except Exception:  # noqa: BLE001
                bad.append(s)
        fix = (
            rewrite_hint(self.path, bad)
            if bad and name in CHECKED_SHARD_ARRAYS
            else "the index written when the store was created is damaged: restore the store from a copy or "
            "rebuild it with `dpal cache-teacher`"
        )
        where = f"shard(s) {', '.join(map(shard_name, bad))}" if bad else "the store"
        return StoreError(
            f"{self.path}: array {name!r} of {where} cannot be read "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); {fix}"
        )

    def valid_rows(self) -> np.ndarray:
        """Store indices of the cached images of finished shards, checked against their markers."""
        return np.flatnonzero(self.meta(VALID)).astype(np.int64)

    def shard_of(self, index: int) -> int:
        return index // self.layout.shard_size

    def _check_range(self, indices: np.ndarray) -> None:
        """Rows outside the store are the caller's mistake, not damage: say so, and no `verify`."""
        indices = np.asarray(indices)
        n = self.layout.num_images
        outside = sorted({int(i) for i in indices[(indices < 0) | (indices >= n)]})
        if outside:
            raise StoreError(
                f"{self.path}: row(s) {', '.join(map(str, outside[:5]))}"
                f"{' ...' if len(outside) > 5 else ''} are outside this store's {n} images (rows 0 to "
                f"{n - 1}); the rows were chosen for another store"
            )

    def _check_params(self, shards: list[int]) -> None:
        """Check each shard's whole `params` chunk against its marker, once per shard and reader
        (one 0.5 MB read at S = 256, K = 4): per-row checks would cost a whole-shard read per batch."""
        for s in shards:
            if s in self._params_checked:
                continue
            if s in self.markers():
                a, b = self.layout.shard_range(s)
                self._check_rows(PARAMS, s, self.array(PARAMS)[a:b])
            self._params_checked.add(s)

    def read_targets(
        self, indices: np.ndarray, view: int, raw: bool = False, targets: Collection[str] = FEATURES
    ) -> Targets:
        """Targets of view `view` of the images `indices` (one orthogonal selection per array).
        `raw`: in the stored dtype (float16, bfloat16, or int8 with `scales`; int8-rotated's
        global and local targets in R's basis, `rotation`), for a caller that decodes them
        elsewhere (stage two, on the training device). `targets`: the FEATURES to read;
        the others are not read and are None.

        Raises:
            StoreError: a shard's data is missing or damaged; the message names the shard.
        """
        self._check_range(indices)
        order = np.argsort(indices, kind="stable")
        sorted_idx = np.asarray(indices)[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        # The view as a one-wide slice, not an integer: with an integer (a dropped axis) Zarr turns
        # the orthogonal selection into per-element coordinates inside every shard, which made the
        # read 9x slower at 32 images (docs/benchmarks.md, loader).
        sel = (sorted_idx, slice(view, view + 1))
        out: dict[str, Tensor] = {}
        arrays = {n: spec for n, spec in self.layout.feature_arrays().items() if _feature_of(n) in targets}
        try:
            for name, (_, scaled) in arrays.items():
                data = self.array(name).oindex[sel][:, 0]
                scale = self.array(name + SCALE_SUFFIX).oindex[sel][:, 0] if scaled else None
                self.check_values(name, sorted_idx, view, data)
                if scale is not None:
                    self.check_values(name + SCALE_SUFFIX, sorted_idx, view, scale)
                if name not in FEATURES:  # the relation factor or diagonal, exactly as stored
                    out[name] = torch.from_numpy(np.ascontiguousarray(data))[inverse]
                elif raw:
                    out[name] = self.layout.codec(name).to_tensor(data)[inverse]
                    if scale is not None:
                        out[name + SCALE_SUFFIX] = torch.from_numpy(scale)[inverse]
                else:
                    kind = self.layout.feature_dtype(name)
                    out[name] = decode(data, scale, kind, self.rotation)[inverse]
        except (zarr.errors.ChunkNotFoundError, ValueError) as e:
            raise self._read_error(e, sorted_idx, view) from None
        scales = (
            tuple(out.get(n + SCALE_SUFFIX) for n in FEATURES)
            if raw and target_codec(self.dtype).scaled
            else None
        )
        params = self.read_params(indices, view)
        if RELATION_FACTOR not in arrays:
            return Targets(out.get(GLOBAL), out.get(LOCAL), out.get(RELATION), params, scales)
        z, diag = out[RELATION_FACTOR], out[RELATION_DIAG]
        # finite and of the store's shapes, or one StoreError line (the chunks' crc32c caught bytes
        # flipped on disk; this catches a factor that stage one wrote wrong)
        check_relation_code(
            RelationCode(z.numpy(), diag.numpy(), FACTOR_DTYPE),
            self.layout.num_crowd_tokens,
            f"{self.path}: the relation factor of shard(s) "
            f"{', '.join(sorted({shard_name(self.shard_of(int(i))) for i in sorted_idx}))}",
        )
        if raw:
            return Targets(out.get(GLOBAL), out.get(LOCAL), z, params, scales, diag)
        return Targets(out.get(GLOBAL), out.get(LOCAL), rebuild_logits(z.float(), diag), params, scales)

    def _value_crcs(self, shard: int, name: str) -> np.ndarray | None:
        """(rows, K) uint32 crc32c of array `name`'s values in a finished shard (`row_crc32c`);
        None where its marker predates them."""
        key = (shard, name)
        if key not in self._value_crc:
            recorded = (
                self.markers()[shard].get(VALUE_CRC32C, {}).get(name) if shard in self.markers() else None
            )
            a, b = self.layout.shard_range(shard)
            self._value_crc[key] = (
                None
                if recorded is None
                else np.frombuffer(bytes.fromhex(recorded), dtype="<u4").reshape(b - a, self.layout.num_views)
            )
        return self._value_crc[key]

    def check_values(self, name: str, rows: np.ndarray, view: int, data: np.ndarray) -> None:
        """Array `name`'s stored values of view `view` of store rows `rows` (`data`, one row each)
        against the crc32c their markers recorded, and finite (float dtypes); else a StoreError
        that names the array, the row, its image key and its shard."""
        shard_size = self.layout.shard_size
        for i, row in enumerate(np.asarray(rows).tolist()):
            want = self._value_crcs(row // shard_size, name)
            if want is not None and crc32c_of(data[i]) != int(want[row % shard_size, view]):
                raise self._value_error(name, row, view, "do not match the checksum its marker recorded")
        bad = nonfinite_rows(data, self.layout.codec(name).nonfinite_kind if name in FEATURES else "")
        if len(bad):
            raise self._value_error(name, int(np.asarray(rows)[bad[0]]), view, "are not finite (NaN or inf)")

    def _value_error(self, name: str, row: int, view: int, what: str) -> StoreError:
        shard = self.shard_of(row)
        return StoreError(
            f"{self.path}: the {name!r} values of row {row} (image {str(self.meta(KEYS)[row])!r}, view {view}, "
            f"shard {shard_name(shard)}) {what} (damaged, or edited through zarr after stage one); "
            f"`dpal store verify --deep` lists every such row; {rewrite_hint(self.path, [shard])}"
        )

    def _read_error(self, e: Exception, sorted_idx: np.ndarray, view: int) -> StoreError:
        """The one line for a feature read that failed: names the shard(s) and what to run."""
        # A missing shard file, or a chunk whose crc32c does not match: name the shard(s).
        shards = sorted({self.shard_of(int(i)) for i in sorted_idx})
        bad = [s for s in shards if not self._shard_readable(s, sorted_idx, view)] or shards
        found = {s: shard_problems(self.path, s) for s in bad}
        if any(found.values()):  # what `dpal store verify` reports: say so, and how to rewrite
            fix = (
                "`dpal store verify` finds "
                + "; ".join(f"{shard_name(s)}: {', '.join(p)}" for s, p in found.items() if p)
                + "; "
                + rewrite_hint(self.path, [s for s, p in found.items() if p])
            )
        else:
            fix = (
                "the shard's files match the checksums stage one recorded (`dpal store verify` finds "
                "nothing), so this is not damage on disk: please report it with this message"
            )
        return StoreError(
            f"{self.path}: data of shard(s) {', '.join(shard_name(s) for s in bad)} cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); {fix}"
        )

    def read_params(self, indices: np.ndarray, view: int) -> np.ndarray:
        """View parameters (B, NUM_PARAMS) of view `view` of the images `indices`, each shard's
        rows checked against its marker.

        Raises:
            StoreError: a shard's parameters are missing or damaged; the message names that shard.
        """
        indices = np.asarray(indices)
        self._check_range(indices)
        order = np.argsort(indices, kind="stable")
        shards = sorted({self.shard_of(int(i)) for i in indices})
        try:
            self._check_params(shards)
            p = self.array(PARAMS).oindex[indices[order], slice(view, view + 1)][:, 0]
        except (zarr.errors.ChunkNotFoundError, ValueError, RuntimeError) as e:  # zstd raises RuntimeError
            bad = []
            for s in shards:  # the whole chunk of each shard: find the one that fails
                a, b = self.layout.shard_range(s)
                try:
                    self.array(PARAMS)[a:b]
                except (zarr.errors.ChunkNotFoundError, ValueError, RuntimeError):
                    bad.append(s)
            raise StoreError(
                f"{self.path}: view parameters of shard(s) {', '.join(shard_name(s) for s in bad or shards)} cannot "
                f"be read ({type(e).__name__}: {str(e).splitlines()[0]}); {rewrite_hint(self.path, bad or shards)}"
            ) from None
        out = np.empty_like(p)
        out[order] = p
        return out

    def _shard_readable(self, shard: int, indices: np.ndarray, view: int) -> bool:
        rows = [int(i) for i in indices if self.shard_of(int(i)) == shard]
        sel = (rows, slice(view, view + 1))
        try:
            for name, (_, scaled) in self.layout.feature_arrays().items():
                self.array(name).oindex[sel]
                if scaled:
                    self.array(name + SCALE_SUFFIX).oindex[sel]
            self.array(PARAMS).oindex[sel]
        except (zarr.errors.ChunkNotFoundError, ValueError):
            return False
        return True

    def image_crc32c(self, index: int) -> int | None:
        """The crc32c stage one recorded for row `index`'s image bytes; None for a schema-1 marker."""
        if self._image_crc is None:
            crc = np.full(self.layout.num_images, -1, dtype=np.int64)
            for s, m in self.markers().items():
                if "image_crc32c" in m:
                    a, _ = self.layout.shard_range(s)
                    crc[a : a + len(m["image_crc32c"])] = [-1 if c is None else c for c in m["image_crc32c"]]
            self._image_crc = crc
        c = int(self._image_crc[index])
        if c < 0 and self.store_meta.schema_version >= 2 and self.meta(VALID)[index]:
            shard = self.shard_of(index)
            raise StoreError(
                f"{marker_path(self.path, shard)}: no image checksum for row {index} of shard "
                f"{shard_name(shard)} (damaged marker); {rewrite_hint(self.path, [shard])}"
            )
        return None if c < 0 else c

    def image_bytes(self, index: int) -> bytes:
        """The source image bytes of store row `index`: from the embedded tar, else the corpus.

        Raises:
            StoreError: the bytes differ from those stage one cached (a damaged image tar, or a
                corpus file changed since); the message names the shard and the fix.
        """
        self._check_range(np.array([index]))
        shard = self.shard_of(index)
        if self.store_meta.embed_images:
            off, size = int(self.meta(IMAGE_OFFSET)[index]), int(self.meta(IMAGE_SIZE)[index])
            if off < 0:
                raise StoreError(f"{self.path}: row {index} has no embedded image (skipped image?)")
            where = self.path / IMAGES_DIR / f"{shard_name(shard)}.tar"
            blob = read_bytes(str(where), off, size)
            fix = rewrite_hint(self.path, [shard])
        else:
            where = Path(str(self.meta(SOURCE)[index]))
            blob = read_bytes(
                str(where), int(self.meta(SOURCE_OFFSET)[index]), int(self.meta(SOURCE_SIZE)[index])
            )
            fix = "restore the corpus as it was when the store was written, or rebuild the store"
        want = self.image_crc32c(index)
        if want is not None and google_crc32c.value(blob) != want:
            raise StoreError(
                f"{where}: the image of row {index} (shard {shard_name(shard)}) does not match the "
                f"checksum stage one recorded (damaged or changed); {fix}"
            )
        return blob

    def fingerprint(self) -> str:
        """Identity of the store's contents: identity attributes plus every marker's checksums."""
        # relation_codec only where set: logits stores keep the fingerprint they always had
        ident = {k: self.attrs.get(k) for k in IDENTITY_ATTRS if k != "relation_codec" or k in self.attrs}
        h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
        for s in sorted(done_shards(self.path)):
            h.update(json.dumps(read_marker(self.path, s)["files"], sort_keys=True).encode())
        return h.hexdigest()
