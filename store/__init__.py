"""The teacher store: the on-disk contract between stage one (writer) and stage two (reader).

The package alone spells the store's layout; every public name of its modules is importable from
here (`from dpal.store import StoreReader`). A store is a Zarr v3 group plus two folders:

    STORE/zarr.json            group attributes (identity, recipe, dtype, grid, complete flag)
    STORE/<array>/...          Zarr v3 arrays, one Zarr shard file per store shard
    STORE/images/000012.tar    WebDataset tar of shard 12's source images (unless not embedded)
    STORE/shards/000012.json   shard 12's marker: written atomically after all its data

Its modules, by concern (docs/store.md documents the schema and keeps the changelog):

    schema.py     version, array names, identity attributes, StoreError, checked attribute reading
    codecs.py     the codec registry: each `--dtype` and relation codec, encode and decode
    relation.py   the relation target's math (row shift, low-rank factor), rotation.py R's
    layout.py     shapes and chunking (`Layout`), meta.py the typed attributes (`StoreMeta`)
    integrity.py  checksums and shard markers, files.py atomic writes and temporaries
    write.py      create a store, write a shard; read.py `StoreReader`; verify.py info and verify

The names are loaded on first use (PEP 562), so that `dpal --help` reads the codec registry
without importing torch or zarr.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = (
    "schema",
    "codecs",
    "layout",
    "meta",
    "integrity",
    "files",
    "relation",
    "rotation",
    "read",
    "write",
    "verify",
)


def __getattr__(name: str) -> Any:
    """`dpal.store.X`: the first of the package's modules that defines X."""
    for module in _MODULES:
        mod = importlib.import_module(f"{__name__}.{module}")
        if name in vars(mod):
            value = vars(mod)[name]
            globals()[name] = value
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULES))
