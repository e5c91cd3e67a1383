"""Token error of stored targets against a float32 store of the same corpus, teacher and views.

For each store given, every valid image's cached views are read through `StoreReader.read_targets`
(decoded exactly as stage two decodes them) and compared token by token with the float32 store:
relative error ||x - y|| / ||y|| per token (each of v0's patch tokens for `local`, the one vector
for `global`), reported as mean, 99th percentile and max, with the token count. A store must hold
the same images and views as the reference (same corpus, seed, views and recipe; only the dtype or
the relation codec differs), else the figures compare different pixels and the script stops.

    python bench/token_error.py --reference /tmp/b12/lite2-f32 /tmp/rb/store_fi8 /tmp/rb/store_rot
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

TARGETS = ("local", "global")


def token_errors(store: str, reference: str) -> dict[str, dict[str, float]]:
    """{target: {mean, p99, max, tokens}} of `store`'s decoded targets against `reference`'s."""
    from dpal.store import StoreReader

    ref, got = StoreReader(reference), StoreReader(store)
    a, b = ref.store_meta, got.store_meta
    same = ("seed", "num_views", "num_images", "recipe", "corpus_fingerprint", "teacher")
    if any(getattr(a, k) != getattr(b, k) for k in same):
        raise SystemExit(f"{store} does not hold the images and views of {reference}")
    rows = ref.valid_rows()
    out: dict[str, dict[str, float]] = {}
    for target in TARGETS:
        errors = []
        for view in range(a.num_views):
            x = getattr(got.read_targets(rows, view, targets=(target,)), _field(target))
            y = getattr(ref.read_targets(rows, view, targets=(target,)), _field(target))
            errors.append(((x - y).double().norm(dim=-1) / y.double().norm(dim=-1)).reshape(-1))
        e = torch.cat(errors).numpy()
        out[target] = {
            "mean": float(e.mean()),
            "p99": float(np.percentile(e, 99)),
            "max": float(e.max()),
            "tokens": int(e.size),
        }
    return out


def _field(target: str) -> str:
    return "global_" if target == "global" else target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="a float32 store of the same corpus and views")
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()
    results = {}
    print(f"{'store':<32} {'target':<7} {'mean':>8} {'p99':>8} {'max':>8} {'tokens':>8}")
    for store in args.stores:
        results[store] = token_errors(store, args.reference)
        for target, r in results[store].items():
            print(
                f"{store:<32} {target:<7} {r['mean']:8.3%} {r['p99']:8.3%} {r['max']:8.3%} {r['tokens']:8d}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
