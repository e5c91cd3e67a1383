"""dpal: pretrain lightweight human-centric vision models by distilling a large teacher (DPAL).

Stage one (`dpal.pipeline`) runs the teacher once and writes a sharded store; stage two
(`dpal.trainer`) trains the student and D-PaDe against it. `dpal.store` is the contract between them.
The Python API (api.py) is here too: `dpal.cache_teacher`, `dpal.distill`, `dpal.export`,
`dpal.load_student`, `dpal.eval_reid`; each loads dpal.api on first use, so that `import dpal`
stays light (no torch).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "cache_teacher", "distill", "eval_reid", "export", "load_student"]
_API = ("cache_teacher", "distill", "eval_reid", "export", "load_student")


def __getattr__(name: str) -> Any:
    if name in _API:
        from dpal import api

        return getattr(api, name)
    raise AttributeError(f"module 'dpal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
