"""The feature store out of core: hashes without vectors, streamed merges and files, batches of rows, streamed indexing."""
from __future__ import annotations

import tracemalloc
import zipfile

import numpy as np
import pandas as pd
import pytest

from vslib import features, npzfile
from vslib.config import parse_config
from vslib.feature_cache import FeatureCache
from vslib.features import FeatureSet, feature_columns, features_path, iter_features, load_features, read_split
from vslib.npzfile import npz_memmap, save_npz_streamed

DIM = 64


def unit(n, dim=DIM, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def peak_bytes(fn):
    """Peak Python/numpy allocation while ``fn()`` runs (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def feature_file(tmp_path, n=50, dim=DIM):
    cfg = parse_config({"backbone": {"name": "efficientnet_lite0"}}, base_dir=tmp_path)
    table = pd.DataFrame({"path": [f"/img/{i:04d}.png" for i in range(n)], "label": [f"c{i % 3}" for i in range(n)],
                          "split": ["query" if i % 4 == 0 else "index" for i in range(n)],
                          "content_hash": [f"h{i:04d}" for i in range(n)]})
    fs = FeatureSet(unit(n, dim), table, cfg.backbone.name)
    fs.save(features_path(cfg))
    return cfg, fs


def test_opening_the_cache_reads_hashes_not_vectors(tmp_path):
    n, dim = 3000, 256  # 3 MB of vectors
    cache = FeatureCache(tmp_path, "bb", "k")
    x = unit(n, dim)
    hashes = [f"h{i}" for i in range(n)]
    cache.add(hashes[:1000], x[:1000])
    cache.add(hashes[1000:], x[1000:])
    again, peak = peak_bytes(lambda: FeatureCache(tmp_path, "bb", "k"))
    assert len(again) == n and "h2999" in again and "nope" not in again
    assert peak < x.nbytes / 4, peak  # the hashes and the index, not the vectors
    rows = [2999, 0, 1500, 999]
    assert np.array_equal(again.get([hashes[i] for i in rows]), x[rows])


def test_compact_streams_and_keeps_every_vector_once(tmp_path, monkeypatch):
    monkeypatch.setattr(npzfile, "STREAM_ROWS", 100)
    n, dim = 2000, 256
    x = unit(n, dim, seed=1)
    hashes = [f"h{i}" for i in range(n)]
    cache = FeatureCache(tmp_path, "bb", "k")
    for s in range(0, n, 500):
        cache.add(hashes[s:s + 500], x[s:s + 500])
    cache.add(hashes[:10], x[:10])  # recomputed duplicates: still one vector each after the merge
    FeatureCache(tmp_path, "other", "k2").add(["f"], unit(1, dim))  # foreign: deleted by compact
    cache = FeatureCache(tmp_path, "bb", "k")
    _, peak = peak_bytes(cache.compact)
    assert peak < x.nbytes / 4, peak
    shards = list(tmp_path.glob("*.npz"))
    assert len(shards) == 1
    with np.load(shards[0]) as z:  # a plain .npz still
        assert sorted(z["hashes"].tolist()) == sorted(hashes) and z["vectors"].shape == (n, dim)
    assert np.array_equal(FeatureCache(tmp_path, "bb", "k").get(hashes), x)


def test_cache_index_looks_up_many_hashes_at_once(tmp_path):
    """The index is sorted bytes beside shard/row codes: membership and rows for a whole manifest in one call,
    text hashes of any length (and non-ASCII ones) included."""
    x = unit(6)
    cache = FeatureCache(tmp_path, "bb", "k")
    cache.add(["b", "é", "a"], x[:3])
    cache.add(np.array(["ccc", "dd"]), x[3:5])
    cache.add(["a"], x[5:6])  # the same hash again, later: the later shard is the one read, as on disk
    ask = ["dd", "zz", "é", "a", "b", "ccc"]
    assert cache.contains(ask).tolist() == [True, False, True, True, True, True]
    assert ("é" in cache, "nope" in cache, len(cache)) == (True, False, 5)
    codes = cache.codes(ask)
    assert codes[1] == -1
    got = cache.rows(codes[[0, 2, 3, 4, 5]])
    assert np.array_equal(got, x[[4, 1, 5, 0, 3]])
    with pytest.raises(KeyError, match="'zz' is not in the feature cache"):
        cache.get(ask)
    cache.compact()  # hashes written back as text: a reopened cache finds them all
    again = FeatureCache(tmp_path, "bb", "k")
    assert np.array_equal(again.get(["é", "a", "dd"]), x[[1, 5, 4]])
    with np.load(again.shards[0]) as z:
        assert z["hashes"].dtype.kind == "U" and sorted(z["hashes"].tolist()) == sorted(["a", "b", "ccc", "dd", "é"])


def test_text_columns_are_streamed_into_the_same_npz_member(tmp_path, monkeypatch):
    monkeypatch.setattr(npzfile, "STREAM_ROWS", 3)
    col = pd.Series(["/a/b.png", "/c/düne.png", "x", "", "/e/f/g/h.png", "/i.png", "/j.png"], dtype="str")
    p = save_npz_streamed(tmp_path / "t.npz", {"path": npzfile.text_member(col), "n": np.arange(3)}, "v", (7, 2),
                          [np.ones((7, 2))])
    with np.load(p) as z:
        assert z["path"].dtype == np.dtype("<U12") and z["path"].tolist() == col.tolist()
        assert z["n"].tolist() == [0, 1, 2]


def test_streamed_npz_is_memory_mappable_and_atomic(tmp_path):
    x = unit(30, 8)
    p = save_npz_streamed(tmp_path / "a.npz", {"names": np.array(["a", "b"])}, "v", x.shape, [x[:7], x[7:]])
    m = npz_memmap(p, "v")
    assert isinstance(m, np.memmap) and np.array_equal(m, x)
    assert m.offset % 64 == 0 and m.flags.aligned  # numeric libraries get aligned data
    with np.load(p) as z:
        assert z["names"].tolist() == ["a", "b"] and np.array_equal(z["v"], x)
    with pytest.raises(ValueError, match="29 rows streamed for a member of 30"):
        save_npz_streamed(tmp_path / "b.npz", {}, "v", x.shape, [x[:29]])
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.npz", "a.npz.sum"]  # nothing torn left behind


def test_a_compressed_shard_is_still_read(tmp_path):
    """Older or hand-made caches written with np.savez_compressed cannot be mapped: they are read whole."""
    x = unit(5, 8)
    np.savez_compressed(tmp_path / "old.npz", hashes=np.array(list("abcde")), vectors=x,
                        backbone=np.array("bb"), key=np.array("k"))
    with zipfile.ZipFile(tmp_path / "old.npz") as zf:
        assert zf.getinfo("vectors.npy").compress_type != zipfile.ZIP_STORED
    cache = FeatureCache(tmp_path, "bb", "k")
    assert len(cache) == 5 and np.array_equal(cache.get(["e", "a"]), x[[4, 0]])


@pytest.mark.parametrize("batch", [1, 7, 12, 1000])
@pytest.mark.parametrize("split", [None, "index", "query"])
def test_iter_features_gives_load_features_in_batches(tmp_path, split, batch):
    cfg, _ = feature_file(tmp_path)
    whole = load_features(cfg)
    ref = whole if split is None else whole.split(split)
    parts = list(iter_features(cfg, split, batch_size=batch))
    assert all(len(p) == batch for p in parts[:-1]) and 0 < len(parts[-1]) <= batch
    assert np.array_equal(np.concatenate([p.vectors for p in parts]), ref.vectors)
    table = pd.concat([p.table for p in parts], ignore_index=True)
    pd.testing.assert_frame_equal(table, ref.table.reset_index(drop=True))
    assert all(p.backbone == "efficientnet_lite0" for p in parts)
    if split:
        cols = feature_columns(cfg, ["content_hash", "path"], split=split)
        assert cols["content_hash"].tolist() == ref.table["content_hash"].tolist()


def test_iter_features_memory_is_one_batch(tmp_path):
    cfg, fs = feature_file(tmp_path, n=4000, dim=256)  # 4 MB of vectors
    _, peak = peak_bytes(lambda: sum(len(b) for b in iter_features(cfg, "index", batch_size=200)))
    assert peak < fs.vectors.nbytes / 4, peak
    _, peak_whole = peak_bytes(lambda: load_features(cfg))
    assert peak_whole >= fs.vectors.nbytes


def test_iter_features_names_the_wrong_backbone_and_a_missing_file(tmp_path):
    cfg, _ = feature_file(tmp_path)
    other = parse_config({"backbone": {"name": "efficientnet_lite2"}}, base_dir=tmp_path)
    other.features_dir.mkdir(parents=True, exist_ok=True)
    features_path(cfg).rename(features_path(other))
    with pytest.raises(features.VisualSearchError, match="holds efficientnet_lite0 vectors.*names efficientnet_lite2"):
        next(iter_features(other))
    with pytest.raises(features.VisualSearchError, match="no features for backbone efficientnet_lite0"):
        next(iter_features(cfg))


@pytest.mark.parametrize("batch", [1, 7, 2048])
@pytest.mark.parametrize("split", ["index", "query"])
def test_read_split_is_the_split_of_load_features(tmp_path, split, batch):
    cfg, _ = feature_file(tmp_path)
    ref = load_features(cfg).split(split)
    got = read_split(cfg, split, batch_size=batch)
    assert np.array_equal(got.vectors, ref.vectors) and got.backbone == ref.backbone
    pd.testing.assert_frame_equal(got.table, ref.table)


def test_read_split_of_an_empty_split_and_a_wrong_name(tmp_path):
    cfg = parse_config({"backbone": {"name": "efficientnet_lite0"}}, base_dir=tmp_path)
    table = pd.DataFrame({"path": ["/a.png", "/b.png"], "label": ["x", "y"], "split": ["index"] * 2,
                          "content_hash": ["h1", "h2"]})
    FeatureSet(unit(2), table, cfg.backbone.name).save(features_path(cfg))
    empty = read_split(cfg, "query")
    ref = load_features(cfg).split("query")
    assert empty.vectors.shape == ref.vectors.shape == (0, DIM) and list(empty.table) == list(ref.table)
    with pytest.raises(ValueError, match="split must be one of .*'index', 'query'.*not 'train'"):
        read_split(cfg, "train")


def test_read_split_memory_is_the_split_once(tmp_path):
    cfg, fs = feature_file(tmp_path, n=4000, dim=1024)  # 16 MB of vectors, 12 MB in the index split
    split_bytes = load_features(cfg).split("index").vectors.nbytes
    got, peak = peak_bytes(lambda: read_split(cfg, "index", batch_size=50))
    assert got.vectors.nbytes == split_bytes
    assert peak < 1.25 * split_bytes, (peak, split_bytes)  # the split once, its table and a few batches
    _, peak_whole = peak_bytes(lambda: load_features(cfg).split("index"))
    assert peak_whole >= fs.vectors.nbytes + split_bytes  # the whole file, then a copy of the split


def test_index_build_adds_batch_by_batch(tmp_path):
    from vslib.index import build, item_ids, open_index

    cfg, fs = feature_file(tmp_path, n=60)
    table = fs.table.copy()
    table.loc[5, "content_hash"] = table.loc[1, "content_hash"]  # same file at two paths: two items
    FeatureSet(fs.vectors, table, fs.backbone).save(features_path(cfg))
    cfg = parse_config({"backbone": {"name": "efficientnet_lite0"},
                        "index": {"backend": "embedded", "embedded": {"factory": "Flat"}}}, base_dir=tmp_path)
    info = build(cfg, batch_size=7, progress=False)
    idx = fs.split("index")
    assert info["count"] == len(idx) == 45
    with open_index(cfg, create=False) as index:
        hits = index.search(idx.vectors, k=1)
        assert [h[0].metadata["path"] for h in hits] == idx.table["path"].tolist()
        assert {h[0].id for h in hits} == set(item_ids(table[table["split"] == "index"]))
