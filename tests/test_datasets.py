"""Datasets: layouts, bad files recorded with reasons, deterministic stratified splits."""
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vslib import datasets
from vslib.datasets import TUXPAINT_ROOT, assign_splits, load_manifest, prepare
from vslib.errors import DatasetError


def noise_image(path: Path, seed: int, size=(48, 40), fmt=None):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)
    return path


@pytest.fixture
def folder_tree(tmp_path):
    """3 classes x 8 images, plus one of each kind of bad file in class 'cats'."""
    root = tmp_path / "images"
    seed = 0
    for cls in ("cats", "dogs", "owls"):
        for i in range(8):
            seed += 1
            noise_image(root / cls / f"{i:02d}.png", seed)
    noise_image(root / "dogs" / "nested" / "deep.jpg", 999, fmt="JPEG")  # nested files count for their class
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    (root / "cats" / "truncated.jpg").write_bytes(buf.getvalue()[:300])
    (root / "cats" / "empty.png").write_bytes(b"")
    (root / "cats" / "README.txt").write_text("not an image")
    Image.new("L", (9000, 9000)).save(root / "cats" / "bomb.png")
    shutil.copy(root / "owls" / "00.png", root / "owls" / "copy_of_00.png")  # exact duplicate
    (root / ".hidden").mkdir()
    noise_image(root / ".hidden" / "x.png", 1234)  # hidden folders are not classes
    for i in range(3):  # a class too small to keep (min_per_class 5)
        noise_image(root / "rare" / f"{i}.png", 500 + i)
    return root


def folder_config(make_config, root, **dataset):
    return make_config({"dataset": {"name": "folder", "root": str(root), "max_image_pixels": 50_000_000,
                                    "split": {"query_fraction": 0.25, "seed": 7}, **dataset}})


def test_folder_layout_records_every_bad_file_with_reason(make_config, folder_tree, capsys):
    cfg = folder_config(make_config, folder_tree)
    df = prepare(cfg, progress=False)
    reasons = dict(zip(df["path"].map(lambda p: Path(p).name), df["reason"]))
    assert reasons["truncated.jpg"].startswith("truncated or corrupt image")
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["README.txt"] == "not an image (unrecognised format)"
    assert reasons["bomb.png"].startswith("too large: 9000x9000 = 81 megapixels")
    assert reasons["copy_of_00.png"].startswith("duplicate of ") and reasons["copy_of_00.png"].endswith("owls/00.png")
    assert all(r.startswith("class has 3 usable images") for r in df.loc[df["label"] == "rare", "reason"])
    assert not df["path"].str.contains(".hidden").any()

    ok = df[df["status"] == "ok"]
    assert sorted(ok["label"].unique()) == ["cats", "dogs", "owls"]
    assert ok.groupby("label").size().to_dict() == {"cats": 8, "dogs": 9, "owls": 8}
    assert (df.loc[df["status"] == "skipped", "split"] == "").all()
    assert ok["width"].eq(48).all() and ok["height"].eq(40).all()
    assert ok["content_hash"].str.fullmatch(r"[0-9a-f]{64}").all()

    out = capsys.readouterr().out
    assert "25 images in 3 classes" in out
    assert "8 files skipped: " in out and "truncated.jpg: truncated or corrupt image" in out
    # the manifest on disk is the same table, and load_manifest keeps only usable rows
    on_disk = pd.read_parquet(cfg.manifest_path)
    assert len(on_disk) == len(df) and list(on_disk.columns) == datasets.MANIFEST_COLUMNS
    assert len(load_manifest(cfg)) == 25


def test_split_is_stratified_deterministic_and_seeded(make_config, folder_tree):
    cfg = folder_config(make_config, folder_tree)
    a = prepare(cfg, progress=False)
    ok = a[a["status"] == "ok"]
    per_class = ok.groupby(["label", "split"]).size().unstack()
    assert per_class["query"].to_dict() == {"cats": 2, "dogs": 2, "owls": 2}  # round(8*.25), round(9*.25)
    b = prepare(cfg, progress=False, force=True)
    pd.testing.assert_frame_equal(a, b)
    other = assign_splits(a, query_fraction=0.25, seed=8)
    assert not other.equals(a["split"])  # the seed matters
    assert (other[a["status"] == "ok"] != "").all()


def test_split_of_one_class_ignores_the_others():
    def table(n_other):
        rows = [("a", f"{i:064x}") for i in range(10)] + [("b", f"{100 + i:064x}") for i in range(n_other)]
        return pd.DataFrame(rows, columns=["label", "content_hash"]).assign(status="ok")

    s1, s2 = table(5), table(50)
    q1 = assign_splits(s1, query_fraction=0.3, seed=1)[:10]
    q2 = assign_splits(s2, query_fraction=0.3, seed=1)[:10]
    assert q1.tolist() == q2.tolist() and (q1 == "query").sum() == 3


def test_small_classes_keep_an_indexed_image():
    df = pd.DataFrame({"label": ["x", "x"], "content_hash": ["0" * 64, "1" * 64], "status": "ok"})
    s = assign_splits(df, query_fraction=0.5, seed=0, min_query=5)
    assert sorted(s) == ["index", "query"]


def test_changed_file_is_rechecked(make_config, folder_tree):
    cfg = folder_config(make_config, folder_tree)
    prepare(cfg, progress=False)
    victim = folder_tree / "dogs" / "03.png"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    df = prepare(cfg, progress=False)
    row = df[df["path"] == str(victim.resolve())].iloc[0]
    assert row["status"] == "skipped" and "truncated" in row["reason"]


def test_max_per_class_caps_deterministically(make_config, folder_tree):
    cfg = folder_config(make_config, folder_tree, max_per_class=5)
    a = prepare(cfg, progress=False)
    ok = a[a["status"] == "ok"]
    assert ok.groupby("label").size().max() == 5
    assert prepare(cfg, progress=False, force=True).equals(a)


def test_missing_folder_and_empty_dataset_errors(make_config, tmp_path):
    with pytest.raises(DatasetError, match=r"dataset folder '.*nowhere' does not exist"):
        prepare(folder_config(make_config, tmp_path / "nowhere"), progress=False)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no class sub-folders with files"):
        prepare(folder_config(make_config, empty), progress=False)
    with pytest.raises(DatasetError, match=r"no manifest at .*run `visualsearch data prepare"):
        load_manifest(folder_config(make_config, empty))


def test_caltech101_layout_drops_background(make_config, tmp_path):
    cats = tmp_path / "downloads" / "caltech-101" / "101_ObjectCategories"
    for c, cls in enumerate(["BACKGROUND_Google", "accordion", "airplanes", "Faces_easy"]):
        for i in range(6):
            noise_image(cats / cls / f"image_{i + 1:04d}.jpg", 100 * c + i, fmt="JPEG")
    cfg = make_config({"dataset": {"name": "caltech101", "root": str(tmp_path / "downloads"), "install": False}})
    df = prepare(cfg, progress=False)
    assert sorted(df["label"].unique()) == ["Faces_easy", "accordion", "airplanes"]
    assert (df["status"] == "ok").all() and (df["split"] == "query").sum() == 3


def test_caltech101_missing_without_download_says_how(make_config, tmp_path):
    cfg = make_config({"dataset": {"name": "caltech101", "root": str(tmp_path), "install": False}})
    with pytest.raises(DatasetError, match=r"no 101_ObjectCategories folder .*caltech-101\.zip"):
        prepare(cfg, progress=False)


def test_tuxpaint_on_installed_package(make_config):
    cfg = make_config({})  # the default dataset
    df = prepare(cfg, progress=False)
    ok = df[df["status"] == "ok"]
    assert all(Path(p).is_relative_to(TUXPAINT_ROOT) for p in df["path"])
    assert not df["path"].str.contains(r"_(?:mirror|flip|back)\.png$").any()
    assert ok["label"].nunique() >= 30 and len(ok) >= 600
    assert ok.groupby("label").size().min() >= 5
    assert df.loc[df["status"] == "skipped", "reason"].ne("").all()
    assert (ok["label"] == "animals/birds").sum() > 20  # group/category labels
    queries = ok[ok["split"] == "query"].groupby("label").size()
    assert queries.index.tolist() == sorted(ok["label"].unique()) and queries.min() >= 1


def test_fashion_mnist_from_debian_idx_files(make_config):
    cfg = make_config({"dataset": {"name": "fashion-mnist", "max_per_class": 6}})
    df = prepare(cfg, progress=False)
    assert len(df) == 60 and (df["status"] == "ok").all()
    assert sorted(df["label"].unique()) == sorted(datasets.FASHION_MNIST_CLASSES)
    assert set(zip(df["width"], df["height"])) == {(28, 28)}
    img = np.asarray(Image.open(df["path"].iloc[0]))
    assert img.shape == (28, 28) and img.std() > 10


def test_read_idx_rejects_truncated(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(5))
    with pytest.raises(DatasetError, match="truncated"):
        datasets.read_idx(p)


def test_fashion_mnist_cap_takes_half_from_each_part_and_fills_from_the_other():
    assert datasets.split_cap(6, 6000, 1000) == (3, 3)
    assert datasets.split_cap(1000, 6000, 1000) == (500, 500)
    assert datasets.split_cap(1001, 6000, 1000) == (501, 500)
    assert datasets.split_cap(6000, 6000, 1000) == (5000, 1000)  # 60,000 images at max_per_class 6000
    assert datasets.split_cap(7000, 6000, 1000) == (6000, 1000)
    assert datasets.split_cap(9000, 6000, 1000) == (6000, 1000)  # everything there is
    assert datasets.split_cap(10, 3, 100) == (3, 7)  # a short train part is filled from test
