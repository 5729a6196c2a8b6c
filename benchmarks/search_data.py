"""The collections the search benchmark runs on, and how hard each is for nearest-neighbour search.

Synthetic clustered unit vectors (:func:`synthetic`, with the generator's parameters
:class:`Synth`, calibrated to real features by :func:`calibrate`), real feature vectors
tiled up to a size (:func:`from_features`) or at their own size (:func:`real_collection`),
and their relative contrast and local intrinsic dimensionality (:func:`hardness`).
"""
from __future__ import annotations

import argparse
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from benchmarks.common import normalise
from vslib.features import FeatureSet

K = 10          # neighbours asked for (recall@K, QPS at k=K)
N_LABELS = 20   # labels of a synthetic collection: one holds ~5% of it


# -- sizes --------------------------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """``10k`` -> 10000, ``1M`` -> 1000000, ``2500`` -> 2500."""
    t = text.strip().lower().replace("_", "")
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a number like 10k, 100k, 1M or 2500") from None
    if value < K + 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"size {text!r} must be a whole number above {K}")
    return int(value)


def fmt_size(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1_000 == 0:
        return f"{n // 1_000}k"
    return str(n)


# -- data ---------------------------------------------------------------------------------------------------------
@dataclass
class Collection:
    vectors: np.ndarray          # float32 (n, dim), unit rows; may be a read-only memmap
    labels: np.ndarray           # int (n,)
    queries: np.ndarray          # float32 (nq, dim), unit rows, not in the collection
    query_labels: np.ndarray     # int (nq,): the label a filtered query asks for
    source: str

    @property
    def raw_bytes(self) -> int:
        return int(self.vectors.shape[0]) * int(self.vectors.shape[1]) * 4


@dataclass(frozen=True)
class Synth:
    """Parameters of the synthetic generator (see :func:`synthetic`); ``--synthetic`` overrides them."""
    per_cluster: int = 250     # points per cluster: the number of clusters grows with n, so a
                               # neighbourhood looks alike at every size (and hardness measured small holds)
    rank: int = 16             # dimension of each cluster's own variation subspace
    spread: float = 0.6        # scale of the in-subspace variation
    noise: float = 0.25        # scale of the isotropic noise (all dims): raises intrinsic dimensionality

    def clusters(self, n: int) -> int:
        return max(N_LABELS, int(round(n / self.per_cluster)))

    def describe(self, n: int) -> str:
        return (f"synthetic: {self.clusters(n)} clusters ({self.per_cluster} points each) = random centre + "
                f"rank-{self.rank} per-cluster variation (scale {self.spread}) + isotropic noise (scale "
                f"{self.noise}), normalised; labels = cluster % {N_LABELS}")


def parse_synth(text: str) -> Synth:
    """``rank=32,noise=0.5`` -> Synth with those fields changed."""
    kw = {}
    fields = Synth.__dataclass_fields__
    for part in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = part.partition("=")
        if key not in fields:
            raise argparse.ArgumentTypeError(f"--synthetic: {key!r} is not a parameter ({', '.join(fields)})")
        try:
            kw[key] = int(value) if fields[key].type == "int" else float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--synthetic: {key}={value!r} is not a number") from None
    return Synth(**kw)


#: the generator's parameters calibrated to real features: ``--calibrate`` on 5,000 Fashion-MNIST
#: EfficientNet-Lite0 vectors (median LID 18.4, RC@10 1.664) chose these (LID 17.6, RC@10 1.659 at that size)
CALIBRATED = Synth(per_cluster=250, rank=16, spread=1.0, noise=0.5)


def synthetic(n: int, nq: int, dim: int, seed: int, cache_dir: Optional[Path], p: Synth = CALIBRATED) -> Collection:
    """Clustered unit vectors: centre + variation in a per-cluster subspace + isotropic noise, normalised.

    Real image embeddings vary along few directions around each class, so pure
    isotropic noise in 1280 dims (where all distances look alike) would be an
    unrealistically hard case for graph indexes; how hard the data is comes from
    ``p`` (calibrated against real features with ``--calibrate``).
    """
    n_clusters = p.clusters(n)
    key = f"synthetic3-n{n}-q{nq}-d{dim}-s{seed}-pc{p.per_cluster}-r{p.rank}-a{p.spread}-b{p.noise}"
    source = p.describe(n)
    if cache_dir is not None and (cache_dir / f"{key}.x.npy").exists():
        try:
            x = np.load(cache_dir / f"{key}.x.npy", mmap_mode="r")
            rest = np.load(cache_dir / f"{key}.rest.npz")
            if x.shape == (n, dim):
                return Collection(x, rest["labels"], rest["queries"], rest["query_labels"], source + " (cached)")
        except (OSError, ValueError) as e:
            print(f"  cached collection {key} unreadable ({e}); regenerating", file=sys.stderr)
    rng = np.random.default_rng(seed)
    centres = normalise(rng.standard_normal((n_clusters, dim), dtype=np.float32))
    cluster = rng.integers(0, n_clusters, n)
    q_cluster = rng.integers(0, n_clusters, nq)
    tmp = None
    if cache_dir is not None and n * dim * 4 > 256 * 2**20:  # large: write straight into a file
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / f".{key}.{uuid.uuid4().hex[:8]}.x.npy"
        x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
    else:
        x = np.empty((n, dim), np.float32)
    q = np.empty((nq, dim), np.float32)
    order = np.argsort(cluster, kind="stable")
    bounds = np.searchsorted(cluster[order], np.arange(n_clusters + 1))
    for c in range(n_clusters):
        crng = np.random.default_rng([seed, c])
        basis = crng.standard_normal((p.rank, dim), dtype=np.float32) / np.sqrt(dim)
        rows = order[bounds[c]:bounds[c + 1]]
        qrows = np.flatnonzero(q_cluster == c)
        for target, idx in ((x, rows), (q, qrows)):
            if len(idx) == 0:
                continue
            m = len(idx)
            # basis rows have norm ~1, so the variation has norm ~spread and the noise norm ~noise
            pts = (centres[c]
                   + (p.spread / np.sqrt(p.rank)) * (crng.standard_normal((m, p.rank), dtype=np.float32) @ basis)
                   + p.noise * crng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim))
            target[np.sort(idx)] = normalise(pts)
    labels = (cluster % N_LABELS).astype(np.int32)
    q_labels = (q_cluster % N_LABELS).astype(np.int32)
    if tmp is not None:
        x.flush()
        del x
        final = cache_dir / f"{key}.x.npy"
        np.savez(cache_dir / f"{key}.rest.npz", labels=labels, queries=q, query_labels=q_labels)
        os.replace(tmp, final)
        x = np.load(final, mmap_mode="r")
    return Collection(x, labels, q, q_labels, source)


# -- hardness -----------------------------------------------------------------------------------------------------
def hardness(x: np.ndarray, q: np.ndarray, k: int = K, k_lid: int = 20, block: int = 131_072) -> dict:
    """How hard nearest-neighbour search is on ``x`` for queries ``q`` (Euclidean distances of unit vectors).

    Relative contrast RC_k (He, Kumar & Chang, ICML 2012) = mean distance from
    the query to the collection / distance to its k-th nearest neighbour: near 1
    means the neighbours hardly stand out. Local intrinsic dimensionality is the
    maximum-likelihood estimate over the k_lid nearest neighbours (Levina &
    Bickel 2004; Amsaleg et al., KDD 2015): LID = -(1/k_lid sum_i ln(d_i /
    d_k_lid))^-1. Both are per query; the medians and means over queries are reported.
    """
    nq = len(q)
    sum_d = np.zeros(nq, np.float64)
    best = np.full((nq, 0), np.inf, np.float32)
    for lo in range(0, len(x), block):
        s = q @ np.asarray(x[lo:lo + block], dtype=np.float32).T
        d = np.sqrt(np.clip(2.0 - 2.0 * s, 0.0, None))
        sum_d += d.sum(axis=1)
        kk = min(k_lid, d.shape[1])
        part = np.partition(d, kk - 1, axis=1)[:, :kk]
        best = np.sort(np.concatenate([best, part], axis=1), axis=1)[:, :k_lid]
    mean_d = sum_d / len(x)
    rc = mean_d / np.maximum(best[:, k - 1], 1e-12)
    d = np.maximum(best, 1e-12)
    lid = -1.0 / np.mean(np.log(d / d[:, -1:]), axis=1).clip(None, -1e-12)
    return {"n": int(len(x)), "queries": int(nq), "k": k, "k_lid": k_lid,
            "rc_median": float(np.median(rc)), "rc_mean": float(np.mean(rc)),
            "lid_median": float(np.median(lid)), "lid_mean": float(np.mean(lid))}


def hardness_gap(h: dict, target: dict) -> float:
    """Distance between two hardness figures: log-ratio of median LID and of (median RC - 1)."""
    return float(np.hypot(np.log(h["lid_median"] / target["lid_median"]),
                          np.log(max(h["rc_median"] - 1, 1e-6) / max(target["rc_median"] - 1, 1e-6))))


def calibrate(target: dict, n: int, nq: int, dim: int, seed: int, base: Synth = Synth()) -> tuple[Synth, dict, list]:
    """Grid-search the generator (rank, spread, noise) for the hardness closest to ``target`` at size ``n``.

    Noise in all dimensions raises LID; a wider spread inside each cluster's
    subspace (against the fixed distance between centres) lowers relative contrast.
    """
    tried = []
    for rank in (8, 16, 32):
        for noise in (0.25, 0.5, 0.75, 1.0):
            for spread in (0.6, 1.0, 1.5, 2.5):
                p = Synth(per_cluster=base.per_cluster, rank=rank, spread=spread, noise=noise)
                col = synthetic(n, nq, dim, seed, None, p)
                h = hardness(col.vectors, col.queries)
                tried.append((hardness_gap(h, target), p, h))
    tried.sort(key=lambda t: t[0])
    return tried[0][1], tried[0][2], [{"gap": g, **p.__dict__, **h} for g, p, h in tried[:10]]


def from_features(path: Path, n: int, nq: int, seed: int) -> Collection:
    """Real feature vectors: ``nq`` held-out rows are the queries; the rest is tiled (perturbed) up to ``n``."""
    feats = FeatureSet.load(path)
    vecs = feats.vectors
    names, label_ids = np.unique(feats.table["label"].astype(str).to_numpy(), return_inverse=True)
    if len(vecs) < nq + K + 1:
        raise SystemExit(f"--features {path}: {len(vecs)} vectors are too few for {nq} queries and k={K}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(vecs))
    qi, ci = perm[:nq], perm[nq:]
    base, base_labels = vecs[ci], label_ids[ci]
    reps = -(-n // len(base))
    x = np.empty((n, vecs.shape[1]), np.float32)
    for r in range(reps):
        lo, hi = r * len(base), min(n, (r + 1) * len(base))
        part = base[:hi - lo].copy()
        if r:  # copies get a small perturbation so they are not exact duplicates
            part += 0.05 * rng.standard_normal(part.shape, dtype=np.float32) / np.sqrt(part.shape[1])
            normalise(part)
        x[lo:hi] = part
    labels = np.resize(base_labels, n).astype(np.int32)
    tiled = f", tiled x{reps} with perturbed copies" if reps > 1 else ""
    return Collection(x, labels, np.ascontiguousarray(vecs[qi]), label_ids[qi].astype(np.int32),
                      f"features {path} ({len(vecs)} vectors, backbone {feats.backbone}, "
                      f"{len(names)} labels{tiled})")


def real_collection(path: Path, nq: int, seed: int) -> Collection:
    """A real FeatureSet as a collection at its own size (no tiling): nq held-out rows are the queries."""
    n = len(FeatureSet.load(path).vectors) - nq
    return from_features(path, n, nq, seed)
