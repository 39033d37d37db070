"""VTAB-1k folder reader: spellings, every bad-line case (file + line in the message), skip mode, conversions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynadapter.data import store
from dynadapter.data.store import DataError, read_task
from dynadapter.data.vtab import VTAB_NUM_CLASSES, import_vtab, read_vtab_task
from pipelines.prepare import main as prepare_main

REPO = Path(__file__).resolve().parents[1]
SPLIT_FILES = {"train": "train800.txt", "val": "val200.txt", "test": "test.txt"}


def write_image(path: Path, mode: str = "RGB", value=None, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        arr = np.full((6, 6), 65535 if value is None else value, dtype=np.uint16)
        Image.fromarray(arr).save(path, format="PNG")
        return
    color = {"RGB": (200, 10, 10), "L": 77, "RGBA": (1, 2, 3, 128), "P": 5, "F": 0.5}[mode] if value is None else value
    Image.new(mode, (6, 6), color).save(path, format=fmt)


def make_task(root: Path, folder: str, n: int = 3, labels=None, union: bool = True, newline: str = "\n") -> Path:
    """A tiny NOAH-layout task: n images per split, labels 0..n-1 unless given."""
    task_dir = root / folder
    for split, fname in SPLIT_FILES.items():
        lines = []
        for i in range(n):
            rel = f"images/{split}/{i:06d}.jpg"
            write_image(task_dir / rel)
            lines.append(f"{rel} {labels[i] if labels else i}")
        (task_dir / fname).write_text(newline.join(lines) + newline, newline="")
    if union:
        train_val = (task_dir / "train800.txt").read_text().splitlines() + (task_dir / "val200.txt").read_text().splitlines()
        (task_dir / "train800val200.txt").write_text("\n".join(train_val) + "\n")
    return task_dir


def set_line(task_dir: Path, fname: str, line: int, text: str) -> None:
    path = task_dir / fname
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "folder, requested, canonical",
    [("cifar", "cifar", "cifar"), ("cifar100", "cifar", "cifar"), ("cifar", "cifar100", "cifar"),
     ("oxford_iiit_pet", "oxford_pet", "oxford_iiit_pet"), ("oxford_pet", "oxford_iiit_pet", "oxford_iiit_pet")],
)
def test_both_folder_spellings_import_under_the_canonical_name(tmp_path, folder, requested, canonical):
    make_task(tmp_path / "vtab", folder)
    [report] = import_vtab(tmp_path / "vtab", [requested], tmp_path / "out", progress=False)
    assert report.task == canonical and report.counts == {"train": 3, "val": 3, "test": 3} and not report.skipped
    data = read_task(tmp_path / "out", canonical)
    assert data.num_classes == VTAB_NUM_CLASSES[canonical]
    assert data.labels.tolist() == [0, 1, 2] * 3
    assert data.paths[:2] == ["images/train/000000.jpg", "images/train/000001.jpg"]
    assert read_task(tmp_path / "out", requested).task == canonical  # an alias finds the stored task too


def test_vtab_class_table_is_the_standard_one():
    natural = {"cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
               "svhn": 10, "sun397": 397}
    specialized = {"patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5}
    structured = {"clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
                  "smallnorb_azi": 18, "smallnorb_ele": 9}
    assert VTAB_NUM_CLASSES == {**natural, **specialized, **structured}


def test_unknown_task_takes_max_label_plus_one(tmp_path):
    make_task(tmp_path, "my_task", labels=[4, 0, 1])
    t = read_vtab_task(tmp_path, "my_task", progress=False)
    assert (t.name, t.num_classes, t.labels.tolist()) == ("my_task", 5, [4, 0, 1] * 3)


def _missing_file(d):
    (d / "images/train/000001.jpg").unlink()
    return "train800.txt", 2, "image not found"


def _corrupt(d):
    (d / "images/val/000002.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return "val200.txt", 3, "unreadable or unconvertible image"


def _truncated(d):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (d / "images/test/000001.jpg").write_bytes(buf.getvalue()[:300])
    return "test.txt", 2, "unreadable or unconvertible image"


def _float_image(d):
    write_image(d / "images/test/000000.tif", "F", fmt="TIFF")
    set_line(d, "test.txt", 1, "images/test/000000.tif 0")
    return "test.txt", 1, "mode F"


def _non_integer(d):
    set_line(d, "train800.txt", 3, "images/train/000002.jpg two")
    return "train800.txt", 3, "label 'two' is not an integer"


def _float_label(d):
    set_line(d, "val200.txt", 1, "images/val/000000.jpg 1.5")
    return "val200.txt", 1, "label '1.5' is not an integer"


def _negative(d):
    set_line(d, "test.txt", 2, "images/test/000001.jpg -1")
    return "test.txt", 2, "negative label -1"


def _beyond(d):
    set_line(d, "train800.txt", 1, "images/train/000000.jpg 100")
    return "train800.txt", 1, "label 100 beyond the 100 classes of cifar"


def _too_few_fields(d):
    set_line(d, "val200.txt", 2, "images/val/000001.jpg")
    return "val200.txt", 2, "2 fields), got 1"


def _too_many_fields(d):
    set_line(d, "val200.txt", 2, "images/val/000001.jpg 1 extra")
    return "val200.txt", 2, "2 fields), got 3"


def _duplicate(d):
    set_line(d, "train800.txt", 3, "images/train/000000.jpg 2")
    return "train800.txt", 3, "duplicate path images/train/000000.jpg (first listed at line 1)"


def _duplicate_across_lists(d):
    set_line(d, "test.txt", 3, "images/train/000000.jpg 0")
    return "test.txt", 3, "train800.txt:1"


def _escaping_path(d):
    set_line(d, "test.txt", 1, "../../etc/passwd 0")
    return "test.txt", 1, "leaves the task folder"


def _empty(d):
    (d / "val200.txt").write_text("\n\n")
    return "val200.txt", 1, "empty list file"


BAD_CASES = {
    "missing-file": _missing_file,
    "corrupt-image": _corrupt,
    "truncated-image": _truncated,
    "unconvertible-image": _float_image,
    "non-integer-label": _non_integer,
    "float-label": _float_label,
    "negative-label": _negative,
    "label-beyond-classes": _beyond,
    "too-few-fields": _too_few_fields,
    "too-many-fields": _too_many_fields,
    "duplicate-path": _duplicate,
    "duplicate-across-lists": _duplicate_across_lists,
    "escaping-path": _escaping_path,
    "empty-list-file": _empty,
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_line_error_names_file_line_and_reason(tmp_path, case):
    d = make_task(tmp_path, "cifar", union=False)
    fname, line, reason = BAD_CASES[case](d)
    with pytest.raises(DataError) as err:
        read_vtab_task(tmp_path, "cifar", progress=False)
    msg = str(err.value)
    assert f"{d / fname}:{line}:" in msg
    assert reason in msg
    assert isinstance(err.value, ValueError)


def test_missing_list_file_is_an_error(tmp_path):
    d = make_task(tmp_path, "cifar")
    (d / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt: list file not found"):
        read_vtab_task(tmp_path, "cifar", progress=False)


def test_skip_mode_drops_and_reports_bad_lines(tmp_path):
    d = make_task(tmp_path, "cifar", n=4)
    set_line(d, "train800.txt", 2, "images/train/000001.jpg x")
    (d / "images/test/000003.jpg").unlink()
    t = read_vtab_task(tmp_path, "cifar", on_bad_line="skip", progress=False)
    assert [(Path(b.file).name, b.line) for b in t.skipped] == [("train800.txt", 2), ("test.txt", 4)]
    assert str(t.skipped[0]).startswith(f"{d / 'train800.txt'}:2: label 'x'")
    assert t.counts() == {"train": 3, "val": 4, "test": 3}
    assert t.paths[:3] == ["images/train/000000.jpg", "images/train/000002.jpg", "images/train/000003.jpg"]
    # the union file still lists the dropped train line: reported as a warning, not stored
    assert [(Path(w.file).name, w.line) for w in t.warnings] == [("train800val200.txt", 2)]


def test_union_file_must_equal_train_plus_val(tmp_path):
    d = make_task(tmp_path, "cifar")
    set_line(d, "train800val200.txt", 4, "images/val/000000.jpg 2")
    with pytest.raises(DataError) as err:
        read_vtab_task(tmp_path, "cifar", progress=False)
    assert f"{d / 'train800val200.txt'}:4: images/val/000000.jpg 2 is not in" in str(err.value)


def test_crlf_list_files_are_accepted(tmp_path):
    make_task(tmp_path, "dtd", newline="\r\n")
    t = read_vtab_task(tmp_path, "dtd", progress=False)
    assert t.counts() == {"train": 3, "val": 3, "test": 3} and t.labels.tolist() == [0, 1, 2] * 3
    assert t.paths[0] == "images/train/000000.jpg"


@pytest.mark.parametrize(
    "mode, value, fmt, rgb",
    [("L", 77, "PNG", (77, 77, 77)), ("RGBA", (1, 2, 3, 128), "PNG", (1, 2, 3)), ("P", 0, "GIF", (0, 0, 0)),
     ("I;16", 65535, "PNG", (255, 255, 255)), ("I;16", 32896, "PNG", (128, 128, 128)),
     ("RGB", (200, 10, 10), "BMP", (200, 10, 10))],
)
def test_odd_modes_are_stored_as_rgb_png(tmp_path, mode, value, fmt, rgb):
    d = make_task(tmp_path, "svhn")
    write_image(d / "images/train/000000.jpg", mode, value, fmt)
    t = read_vtab_task(tmp_path, "svhn", progress=False)
    with Image.open(io.BytesIO(t.images[0])) as im:
        assert (im.format, im.mode) == ("PNG", "RGB")
        assert im.getpixel((2, 2)) == rgb
    with Image.open(io.BytesIO(t.images[1])) as im:  # plain RGB JPEG: stored as the original bytes
        assert im.format == "JPEG"
    assert t.images[1] == (d / "images/train/000001.jpg").read_bytes()


def _prepare_args(tmp_path: Path, *extra: str) -> list[str]:
    sets = [f"base.paths.data={tmp_path}/data",
            f"base.paths.outputs={tmp_path}/outputs", "prepare.source=vtab", f"prepare.vtab_root={tmp_path}/vtab",
            "base.tasks=[cifar100, dtd]", *extra]
    return ["--params", str(REPO / "params.yaml")] + [a for s in sets for a in ("--set", s)]


def test_prepare_stage_imports_vtab_and_reports_skips(tmp_path, capsys):
    make_task(tmp_path / "vtab", "cifar")
    d = make_task(tmp_path / "vtab", "dtd")
    set_line(d, "test.txt", 2, "images/test/000001.jpg -4")
    assert prepare_main(_prepare_args(tmp_path, "prepare.on_bad_line=skip")) == 0
    assert store.list_tasks(tmp_path / "data") == ["cifar", "dtd"]
    summary = json.loads((tmp_path / "outputs/prepare/summary.json").read_text())
    assert summary["tasks"]["dtd"]["counts"] == {"train": 3, "val": 3, "test": 2}
    assert summary["skipped"] == {"cifar": [], "dtd": [f"{d / 'test.txt'}:2: negative label -4"]}
    assert f"{d / 'test.txt'}:2: negative label -4" in capsys.readouterr().err


def test_prepare_stage_stops_on_bad_line_with_exit_2(tmp_path, capsys):
    make_task(tmp_path / "vtab", "cifar")
    d = make_task(tmp_path / "vtab", "dtd")
    set_line(d, "val200.txt", 3, "images/val/000002.jpg 99")
    assert prepare_main(_prepare_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"error: {d / 'val200.txt'}:3: label 99 beyond the 47 classes of dtd" in err
    assert "Traceback" not in err
    assert not (tmp_path / "outputs/prepare/summary.json").exists()
