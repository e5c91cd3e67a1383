"""The compact store's codecs (issue 12 groundwork) on real teacher targets: bytes per view against
reconstruction error, for a grid of relation ranks r and token components r_pca.

Teachers: the real ImageNet EfficientNet-Lite2 (`efficientnet-lite2`, offline weights) at the
demo's view sizes (v0 128x64, local 64x48, Ic 128x128: D = 1280, P = 32, T = 65), and a randomly
initialised ViT-B/16 (`vit_base_patch16_224`, random_init) at the paper's sizes (v0 256x128, Ic
256x256: D = 768, P = 128, T = 257). Random-init ViT tokens are NOT a trained teacher's: their
spectrum (how much a few directions carry) differs, so the ViT-B rows show the code at the paper's
shapes, not the error a trained PATH-B would get.

Views: evenly spaced images of sample_data/corpus, K = 1 view each, replayed with views.sample_view
and views.replay as stage one does. The images are split in two halves: the "shard" basis is fitted
on the evaluated half's own tokens (what a shard's single writer would do), the "store" basis on
the other half (a pre-pass over other images; held-out). Every error is measured on the evaluated
half, against the float32 targets:

- relation: mean over rows of KL(softmax(true) || softmax(rebuilt)), true = F F^T / sqrt(D) in
  float32 as the teacher computes it; also the float16 and int8 stores of today for reference;
- tokens (v0's patch tokens, the `local` target): ||x - x^|| / ||x|| per token, mean and worst;
- global: v0's global token stored float16, relative error.

Bytes per view: `pca_codec.bytes_per_view`, the basis amortised over a shard of S x K views (S = 64,
K = 4 for the demo's shapes; S = 256, K = 4 for the paper's). Encode cost: the codec's encode per
view (eigendecomposition of the T x T logits, projection, int8) against the teacher's forward per
view, on the same CPU threads.

    .venv/bin/python bench/bench_codec.py --json /tmp/dpal_bench/codec.json  # ~3 min on 1 thread
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpal.config import ViewRecipe
from dpal.corpus import decode_image
from dpal.store import encode as store_encode
from dpal.store import relation, shift_rows
from dpal.teachers import Teacher, TeacherSpec, load_teacher
from dpal.views import background_index, replay, sample_view

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/pca_codec.py
import pca_codec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LIMIT_BYTES = 60_000  # "60 KB" read as 60,000 bytes (61,440 if KiB; the stricter one)
KL_TARGET, TOKEN_TARGET = 1e-3, 0.01
SETUPS = {
    "efficientnet-lite2": dict(
        spec=dict(name="efficientnet-lite2", global_size=(128, 64), crowd_size=(128, 128)),
        recipe=dict(global_size=(128, 64), local_size=(64, 48), crowd_size=(128, 128)),
        views_per_basis=64 * 4,
        ranks=(4, 8, 12, 16, 24, 32, 48, 65),
    ),
    "vit-b-random": dict(
        spec=dict(name="vit_base_patch16_224", random_init=True),
        recipe=dict(),
        views_per_basis=256 * 4,
        ranks=(4, 8, 16, 24, 32, 48, 64, 96, 128),
    ),
}
COMPONENTS = (32, 64, 128, 192, 256, 384, 512, 768)


def corpus_images(n: int) -> list[Any]:
    files = sorted((ROOT / "sample_data" / "corpus").glob("*.jpg"))
    pick = np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)
    return [decode_image(files[i].read_bytes()) for i in pick]


def replayed_views(recipe: ViewRecipe, images: list[Any], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One view per image, as stage one samples and replays it: v0 (N, 3, Hg, Wg), Ic (N, 3, Hc, Wc)."""
    pool = [(i, (im.height, im.width)) for i, im in enumerate(images)]
    v0s, ics = [], []
    for i, im in enumerate(images):
        p = sample_view(recipe, seed, f"img{i:04d}", 0, (im.height, im.width), [q for q in pool if q[0] != i])
        v0, ic = replay(recipe, p, im, images[background_index(p)])
        v0s.append(v0)
        ics.append(ic)
    return torch.stack(v0s), torch.stack(ics)


@torch.inference_mode()
def teacher_tokens(teacher: Teacher, v0: torch.Tensor, ic: torch.Tensor, batch: int) -> dict[str, Any]:
    """g (N, D), patches (N, P, D), Ic tokens (N, T, D), and the forward's seconds per view (v0 and Ic
    through the teacher plus the relation matmul: what `teacher_targets` does)."""
    out: dict[str, list] = {"g": [], "patches": [], "ic": []}
    t0 = time.perf_counter()
    for i in range(0, len(v0), batch):
        g, patches = teacher.encode_global(v0[i : i + batch])
        f = teacher.encode_crowd(ic[i : i + batch])
        relation.relation_logits(f)
        out["g"].append(g.float())
        out["patches"].append(patches.float())
        out["ic"].append(f.float())
    sec = (time.perf_counter() - t0) / len(v0)
    return {**{k: torch.cat(v) for k, v in out.items()}, "forward_s_per_view": sec}


def _kl(true: torch.Tensor, rebuilt: torch.Tensor) -> float:
    return float(relation.row_kl(true, rebuilt).mean())


@torch.inference_mode()
def relation_rows(ic: torch.Tensor, ranks: tuple[int, ...]) -> list[dict[str, Any]]:
    """KL of the rank-r factor (float16 and int8 Z) per r, and of today's float16 and int8 stores."""
    true = relation.relation_logits(ic)
    t = true.shape[-1]
    rows = []
    for name in ("float16", "int8"):  # today's stores: logits minus row max, per dtype
        q, s = store_encode(shift_rows(true.numpy()), name)
        got = torch.from_numpy(q.astype(np.float32) * (s[..., None] if s is not None else 1.0))
        rows.append(
            {
                "what": f"store {name} (today)",
                "kl": _kl(true, got),
                "bytes": t * t * q.itemsize + (4 * t if s is not None else 0),
            }
        )
    for r in ranks:
        factor = relation.relation_factor(ic, r)
        for dtype in ("float16", "int8"):
            code = relation.encode_relation(factor, dtype)
            got = relation.decode_relation(code)
            # the same factor without the exact diagonal: what the T float32 values buy
            no_diag = (
                got
                if dtype == "int8"
                else torch.from_numpy(code.z).float() @ torch.from_numpy(code.z).float().mT
            )
            cfg = pca_codec.CodecConfig(relation_rank=r, relation_dtype=dtype)
            rows.append(
                {
                    "what": "factor",
                    "r": r,
                    "dtype": dtype,
                    "kl": _kl(true, got),
                    "kl_without_diagonal": _kl(true, no_diag) if dtype == "float16" else float("nan"),
                    "bytes": pca_codec.bytes_per_view(cfg, ic.shape[-1], 0, t)["relation"],
                    "kept_energy": float(
                        1
                        - (relation.truncation_error(factor.eigenvalues, r) ** 2).sum()
                        / (factor.eigenvalues.double() ** 2).sum()
                    ),
                }
            )
    return rows


def _token_err(x: torch.Tensor, basis: pca_codec.TokenBasis) -> tuple[torch.Tensor, torch.Tensor]:
    got = pca_codec.decode_tokens(pca_codec.encode_tokens(x, basis), basis)
    return pca_codec.relative_error(x, got), got


def today_token_rows(x: torch.Tensor) -> list[dict[str, Any]]:
    """v0 patch-token error of today's float16 and int8 (per-token scale) stores, for reference."""
    rows = []
    for name in ("float16", "int8"):
        q, s = store_encode(x.numpy(), name)
        err = pca_codec.relative_error(
            x, torch.from_numpy(q.astype(np.float32) * (s[..., None] if s is not None else 1.0))
        )
        rows.append(
            {
                "basis": f"store {name} (today)",
                "r_pca": x.shape[-1],
                "scales": "-",
                "bytes": x.shape[1] * (x.shape[-1] * q.itemsize + (4 if s is not None else 0)),
                "local_mean": float(err.mean()),
                "local_max": float(err.max()),
                "ic_mean": float("nan"),
                "relation_kl_via_tokens": float("nan"),
            }
        )
    return rows


@torch.inference_mode()
def token_rows(fit_other: dict[str, torch.Tensor], ev: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per r_pca, scales and basis kind: v0 patch-token error, and the relation rebuilt from Ic's
    coded tokens (the alternative to the factor). One basis over v0's patches and Ic's tokens."""
    d = ev["patches"].shape[-1]
    true_rel = relation.relation_logits(ev["ic"])
    rows = today_token_rows(ev["patches"])
    for kind, src in (("shard", ev), ("store", fit_other)):
        sample = torch.cat([src["patches"].reshape(-1, d), src["ic"].reshape(-1, d)])
        for scales in pca_codec.TOKEN_SCALES:
            # one fit with all D components; its first r rows are the fit at r (eigenvalues sorted).
            # r_pca = D is a rotation: as many int8 bytes as today's int8, its steps set per component
            full = pca_codec.fit_token_basis(sample, d, scales=scales)
            for r in sorted({c for c in COMPONENTS if c < d} | {d}):
                basis = pca_codec.TokenBasis(
                    full.mean, full.components[:r].copy(), full.component_scale[:r].copy()
                )
                err, _ = _token_err(ev["patches"], basis)
                ic_err, ic_got = _token_err(ev["ic"], basis)
                rows.append(
                    {
                        "basis": kind,
                        "r_pca": r,
                        "scales": scales,
                        "local_mean": float(err.mean()),
                        "local_max": float(err.max()),
                        "ic_mean": float(ic_err.mean()),
                        "relation_kl_via_tokens": _kl(true_rel, relation.relation_logits(ic_got)),
                    }
                )
    return rows


@torch.inference_mode()
def encode_cost(ev: dict[str, torch.Tensor], r: int, r_pca: int, batch: int) -> dict[str, float]:
    """Seconds per view of each encode (relation factor, PCA token code, today's int8) and of one basis fit."""
    n, d = len(ev["patches"]), ev["patches"].shape[-1]
    sample = torch.cat([ev["patches"].reshape(-1, d), ev["ic"].reshape(-1, d)])
    t0 = time.perf_counter()
    basis = pca_codec.fit_token_basis(sample, r_pca)
    out = {"basis_fit_s": time.perf_counter() - t0, "basis_fit_tokens": int(sample.shape[0])}
    parts = {
        "relation_s_per_view": lambda i: relation.encode_relation(
            relation.relation_factor(ev["ic"][i : i + batch], r)
        ),
        "pca_s_per_view": lambda i: pca_codec.encode_tokens(ev["patches"][i : i + batch], basis),
        "int8_s_per_view": lambda i: store_encode(ev["patches"][i : i + batch].numpy(), "int8"),
    }
    for name, fn in parts.items():
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            fn(i)
        out[name] = (time.perf_counter() - t0) / n
    return out


def _token_options(tok: list[dict]) -> list[tuple[dict[str, Any], dict]]:
    """(CodecConfig fields, row) of each token option that meets the token target: PCA with the
    shard basis, or today's int8 / float16 per token."""
    out = []
    for x in tok:
        if x["local_mean"] > TOKEN_TARGET:
            continue
        if x["basis"] == "shard":
            out.append(({"token_codec": "pca", "token_components": x["r_pca"]}, x))
        elif x["basis"].startswith("store int8"):
            out.append(({"token_codec": "int8"}, x))
        elif x["basis"].startswith("store float16"):
            out.append(({"token_codec": "float16"}, x))
    return out


def pick(
    setup: dict[str, Any], dims: tuple[int, int, int], rel: list[dict], tok: list[dict]
) -> list[dict[str, Any]]:
    """Every (relation option, token option) that meets both error targets, smallest total bytes first."""
    d, p, t = dims
    out = []
    for fields, tr in _token_options(tok):
        options = [
            (pca_codec.CodecConfig(relation_rank=x["r"], relation_dtype=x["dtype"], **fields), x["kl"])
            for x in rel
            if x["what"] == "factor"
        ]
        if fields["token_codec"] == "pca":
            options.append(
                (pca_codec.CodecConfig(relation_source="tokens", **fields), tr["relation_kl_via_tokens"])
            )
        for cfg, kl in options:
            if kl <= KL_TARGET:
                size = pca_codec.bytes_per_view(cfg, d, p, t, setup["views_per_basis"])
                out.append(
                    {
                        "config": cfg.__dict__,
                        "scales": tr["scales"],
                        "bytes": size,
                        "kl": kl,
                        "local_mean": tr["local_mean"],
                        "local_max": tr["local_max"],
                    }
                )
    return sorted(out, key=lambda o: (o["bytes"]["total"], o["kl"]))


def run_teacher(name: str, n_images: int, batch: int) -> dict[str, Any]:
    setup = SETUPS[name]
    teacher = load_teacher(TeacherSpec(**setup["spec"]))
    v0, ic = replayed_views(ViewRecipe(**setup["recipe"]), corpus_images(n_images))
    tokens = teacher_tokens(teacher, v0, ic, batch)
    half = n_images // 2
    fit_other = {k: tokens[k][:half] for k in ("patches", "ic")}
    ev = {k: tokens[k][half:] for k in ("g", "patches", "ic")}
    dims = (ev["patches"].shape[-1], ev["patches"].shape[1], ev["ic"].shape[1])
    g16 = pca_codec.relative_error(ev["g"], ev["g"].half().float())
    rel = relation_rows(ev["ic"], setup["ranks"])
    tok = token_rows(fit_other, ev)
    picks = pick(setup, dims, rel, tok)
    best = picks[0]["config"] if picks else {"relation_rank": 32, "token_components": 256}
    cost = encode_cost(ev, min(best["relation_rank"], dims[2]), best["token_components"], batch)
    cost["forward_s_per_view"] = tokens["forward_s_per_view"]
    tok_s = cost["pca_s_per_view"] if best.get("token_codec", "pca") == "pca" else cost["int8_s_per_view"]
    cost["encode_s_per_view"] = cost["relation_s_per_view"] + tok_s
    cost["encode_share"] = cost["forward_s_per_view"] / (
        cost["forward_s_per_view"] + cost["encode_s_per_view"]
    )
    return {
        "teacher": name,
        "D_P_T": dims,
        "views": {"fit_other": half, "evaluated": n_images - half},
        "global_f16": {"mean": float(g16.mean()), "max": float(g16.max())},
        "relation": rel,
        "tokens": tok,
        "picks": picks[:5],
        "cost": cost,
        "views_per_basis": setup["views_per_basis"],
    }


def report(res: dict[str, Any]) -> None:
    d, p, t = res["D_P_T"]
    print(
        f"\n== {res['teacher']}: D={d} P={p} T={t}; {res['views']} views; basis over {res['views_per_basis']} views"
    )
    print(f"global float16: rel err mean {res['global_f16']['mean']:.2e} max {res['global_f16']['max']:.2e}")
    print(
        "relation: what | r | Z dtype | bytes | mean row KL | KL without the exact diagonal | kept eigen-energy"
    )
    for x in res["relation"]:
        print(
            f"  {x['what']} | {x.get('r', '-')} | {x.get('dtype', '-')} | {x['bytes']} | {x['kl']:.2e} | "
            f"{x.get('kl_without_diagonal', float('nan')):.2e} | {x.get('kept_energy', float('nan')):.6f}"
        )
    print(
        "tokens: basis | r_pca | scales | local bytes | local err mean | max | Ic err mean | relation KL via tokens"
    )
    for x in res["tokens"]:
        lb = x.get("bytes", p * (x["r_pca"] + 4))
        print(
            f"  {x['basis']} | {x['r_pca']} | {x['scales']} | {lb} | {x['local_mean']:.4f} | {x['local_max']:.4f} | "
            f"{x['ic_mean']:.4f} | {x['relation_kl_via_tokens']:.2e}"
        )
    c = res["cost"]
    print(
        f"cost per view: forward {c['forward_s_per_view'] * 1e3:.1f} ms; encode {c['encode_s_per_view'] * 1e3:.2f} ms "
        f"(relation factor {c['relation_s_per_view'] * 1e3:.2f}, PCA tokens {c['pca_s_per_view'] * 1e3:.2f}, "
        f"today's int8 tokens {c['int8_s_per_view'] * 1e3:.2f}); forward/(forward+encode) {c['encode_share']:.4f}; "
        f"basis fit {c['basis_fit_s']:.2f} s over {c['basis_fit_tokens']} tokens (once per basis)"
    )
    if not res["picks"]:
        print(f"no configuration meets KL <= {KL_TARGET} and token error <= {TOKEN_TARGET:.0%}")
    for x in res["picks"]:
        ok = "meets" if x["bytes"]["total"] <= LIMIT_BYTES else "EXCEEDS"
        print(
            f"  pick: {x['config']} scales={x['scales']}: {x['bytes']} ({ok} {LIMIT_BYTES}), KL {x['kl']:.2e}, "
            f"local err mean {x['local_mean']:.4f} max {x['local_max']:.4f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default=",".join(SETUPS), help="comma list of " + ", ".join(SETUPS))
    ap.add_argument(
        "--images", type=int, default=319, help="EfficientNet-Lite2 images (half fit, half evaluated)"
    )
    ap.add_argument("--vit-images", type=int, default=48, help="ViT-B images (half fit, half evaluated)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"threads": args.threads, "load_before": os.getloadavg()[0], "results": []}
    for name in args.teachers.split(","):
        res = run_teacher(name, args.vit_images if name.startswith("vit") else args.images, args.batch)
        report(res)
        out["results"].append(res)
    out["load_after"] = os.getloadavg()[0]
    print(
        f"\nload average (1 min) {out['load_before']:.2f} before, {out['load_after']:.2f} after; "
        f"{args.threads} torch thread(s)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
