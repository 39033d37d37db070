"""Parquet store contracts (round trip, validation, atomic writes) and the torch views over it."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dynadapter.data import store
from dynadapter.data.dataset import TaskDataset, load_split_tensors
from dynadapter.data.store import DataError, list_tasks, read_task, resolve_split, split_union, write_task


def png(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_rows(n_per_split: int = 4, num_classes: int = 3) -> tuple[list[bytes], list[int], list[str]]:
    images, labels, splits = [], [], []
    for split in ("train", "val", "test"):
        for i in range(n_per_split):
            images.append(png((10 * i, 20, 30 + len(split))))
            labels.append(i % num_classes)
            splits.append(split)
    return images, labels, splits


@pytest.fixture
def stored(tmp_path):
    images, labels, splits = make_rows()
    write_task(tmp_path, "toy", images, labels, splits, 3, "test", class_names=["a", "b", "c"],
               difficulty=np.linspace(0, 1, len(images)))
    return tmp_path, images, labels, splits


def test_round_trip_keeps_bytes_labels_splits_and_manifest(stored):
    root, images, labels, splits = stored
    data = read_task(root, "toy")
    assert data.images == images
    assert data.labels.dtype == np.int64 and data.labels.tolist() == labels
    assert data.splits.tolist() == splits
    assert data.difficulty is not None and data.difficulty.shape == (12,)
    m = data.manifest
    assert (m["task"], m["num_classes"], m["source"], m["image_size"]) == ("toy", 3, "test", 8)
    assert m["counts"] == {"train": 4, "val": 4, "test": 4}
    assert m["class_names"] == ["a", "b", "c"]
    assert m["checksum"] == "sha256:" + store.file_sha256(root / "toy" / "data.parquet")
    assert list_tasks(root) == ["toy"]


@pytest.mark.parametrize(
    "split, stored_splits",
    [("train", ("train",)), ("train800", ("train",)), ("val200", ("val",)), ("test", ("test",)),
     ("trainval", ("train", "val")), ("train800val200", ("train", "val"))],
)
def test_split_names_select_stored_rows(stored, split, stored_splits):
    root, images, _, splits = stored
    assert resolve_split(split) == stored_splits
    data = read_task(root, "toy", split)
    assert data.images == [im for im, s in zip(images, splits) if s in stored_splits]
    assert set(data.splits.tolist()) == set(stored_splits)


def test_split_union_orders_and_rejects_unknown():
    assert split_union("val", "train800") == ("train", "val")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        resolve_split("dev")


def test_image_size_is_null_for_mixed_sizes(tmp_path):
    write_task(tmp_path, "mixed", [png((0, 0, 0), (8, 8)), png((0, 0, 0), (9, 7))], [0, 1], ["train", "test"], 2, "t")
    assert read_task(tmp_path, "mixed").manifest["image_size"] is None


def _rewrite(root, table: pa.Table) -> None:
    """Replace data.parquet and fix the checksum, so only the schema / content check can catch it."""
    path = root / "toy" / "data.parquet"
    pq.write_table(table, path)
    manifest_path = root / "toy" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["checksum"] = "sha256:" + store.file_sha256(path)
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda t: t.set_column(1, "label", t.column("label").cast(pa.int32())), "field 'label' should be int64, got int32"),
        (lambda t: t.drop_columns(["split"]), "column 2 should be 'split'"),
        (lambda t: t.rename_columns(["img", "label", "split", "difficulty"]), "column 0 should be 'image'"),
        (lambda t: t.append_column("note", pa.array(["x"] * t.num_rows)), "unexpected field 'note'"),
        (lambda t: t.set_column(3, "difficulty", t.column("difficulty").cast(pa.float64())),
         "field 'difficulty' should be float, got double"),
    ],
    ids=["label-type", "missing-split", "renamed-image", "extra-column", "optional-type"],
)
def test_schema_mismatch_names_file_and_field(stored, tamper, message):
    root = stored[0]
    _rewrite(root, tamper(pq.read_table(root / "toy" / "data.parquet")))
    with pytest.raises(DataError, match="schema mismatch") as err:
        read_task(root, "toy")
    assert "data.parquet" in str(err.value) and message in str(err.value)


def test_label_outside_class_range_is_rejected(stored):
    root = stored[0]
    t = pq.read_table(root / "toy" / "data.parquet")
    _rewrite(root, t.set_column(1, "label", pa.array([7] * t.num_rows, type=pa.int64())))
    with pytest.raises(DataError, match=r"row 0: label 7 outside \[0, 3\)"):
        read_task(root, "toy")


def test_checksum_mismatch_is_rejected(stored):
    root = stored[0]
    with open(root / "toy" / "data.parquet", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(DataError, match="checksum mismatch") as err:
        read_task(root, "toy")
    assert str(root / "toy" / "data.parquet") in str(err.value)


def test_missing_manifest_names_the_file(stored):
    root = stored[0]
    (root / "toy" / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest not found") as err:
        read_task(root, "toy")
    assert str(root / "toy" / "manifest.json") in str(err.value)
    assert list_tasks(root) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": [0, 5]}, r"label 5 at row 1 outside \[0, 3\)"),
        ({"labels": [0, -1]}, r"label -1 at row 1"),
        ({"splits": ["train", "dev"]}, r"unknown split value\(s\) \['dev'\]"),
        ({"labels": [0]}, "differ in length"),
        ({"task": "../evil"}, "invalid task name"),
        ({"class_names": ["a"]}, "1 class names for 3 classes"),
    ],
)
def test_write_task_rejects_bad_rows(tmp_path, kwargs, message):
    args = {"task": "toy", "images": [png((1, 2, 3))] * 2, "labels": [0, 1], "splits": ["train", "test"],
            "num_classes": 3, "source": "t"}
    args.update(kwargs)
    with pytest.raises(DataError, match=message):
        write_task(tmp_path, **args)
    assert not any(tmp_path.iterdir())


def _fail_write_table(*args, **kwargs):
    raise OSError("disk full")


def _fail_json_dump(*args, **kwargs):
    raise OSError("disk full")


def _fail_second_replace(real):
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old version was moved aside; now the new one fails to move in
            raise OSError("rename failed")
        return real(src, dst)

    return replace


@pytest.mark.parametrize("failure", ["write_table", "manifest", "swap"])
def test_failed_write_keeps_previous_version_and_leaves_no_temp(stored, monkeypatch, failure):
    root = stored[0]
    before = {p.name: p.read_bytes() for p in (root / "toy").iterdir()}
    if failure == "write_table":
        monkeypatch.setattr(store.pq, "write_table", _fail_write_table)
    elif failure == "manifest":
        monkeypatch.setattr(store.json, "dump", _fail_json_dump)
    else:
        monkeypatch.setattr(store.os, "replace", _fail_second_replace(store.os.replace))
    with pytest.raises(OSError):
        write_task(root, "toy", [png((9, 9, 9))], [1], ["train"], 3, "new")
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["toy"]  # no temp / old folder left behind
    assert {p.name: p.read_bytes() for p in (root / "toy").iterdir()} == before
    assert read_task(root, "toy").manifest["source"] == "test"


def test_rewrite_replaces_previous_version(stored):
    root = stored[0]
    write_task(root, "toy", [png((9, 9, 9))], [2], ["test"], 3, "new")
    data = read_task(root, "toy")
    assert (data.labels.tolist(), data.manifest["source"]) == ([2], "new")
    assert sorted(p.name for p in root.iterdir()) == ["toy"]


# ---------------------------------------------------------------------------------------- torch views


def test_dataset_shapes_dtypes_and_normalisation(tmp_path):
    write_task(tmp_path, "px", [png((255, 0, 51), (8, 8)), png((0, 255, 0), (8, 8))], [1, 0], ["train", "train"],
               2, "t")
    mean, std = (0.5, 0.25, 0.1), (0.5, 0.25, 0.2)
    ds = TaskDataset(tmp_path, "px", "train", img_size=8, mean=mean, std=std)
    x, y = ds[0]
    assert (x.shape, x.dtype, y.dtype, len(ds)) == ((3, 8, 8), torch.float32, torch.int64, 2)
    assert y.item() == 1
    expected = torch.tensor([(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (0.2 - 0.1) / 0.2])
    assert torch.allclose(x[:, 3, 3], expected, atol=1e-6)


@pytest.mark.parametrize("img_size", [8, 16, 32])
def test_load_split_tensors_resizes_and_defaults_to_imagenet_stats(tmp_path, img_size):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    images, labels, splits = make_rows()
    write_task(tmp_path, "toy", images, labels, splits, 3, "t")
    x, y = load_split_tensors(tmp_path, "toy", "trainval", img_size)
    assert (x.shape, x.dtype, y.dtype) == ((8, 3, img_size, img_size), torch.float32, torch.int64)
    assert y.tolist() == labels[:8]
    # image 0 is the constant colour (0, 20, 35): resizing a flat image keeps its value
    want = [(v / 255 - m) / s for v, m, s in zip((0, 20, 35), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    assert torch.allclose(x[0, :, img_size // 2, img_size // 2], torch.tensor(want, dtype=torch.float32), atol=1e-5)
