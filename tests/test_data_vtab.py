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
from dynadapter.data.vtab import VTAB_ALIASES, VTAB_NUM_CLASSES, find_task_folder, import_vtab, read_vtab_task
from pipelines.prepare import main as prepare_main
from vtab_layout import write_get_vtab1k_task

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


def test_unknown_task_counts_the_classes_of_train800(tmp_path):
    make_task(tmp_path, "my_task", labels=[2, 0, 1])
    t = read_vtab_task(tmp_path, "my_task", progress=False)
    assert (t.name, t.num_classes, t.labels.tolist()) == ("my_task", 3, [2, 0, 1] * 3)


def _stray_label_task(root: Path) -> Path:
    """An unknown task with labels 0..5 in every list and one line labelled 99 (val200.txt line 4)."""
    d = make_task(root, "my_task", n=6)
    set_line(d, "val200.txt", 4, "images/val/000003.jpg 99")
    return d


def test_unknown_task_stray_label_is_a_bad_line(tmp_path):
    d = _stray_label_task(tmp_path)
    with pytest.raises(DataError, match="label 99 breaks the class ids 0..5") as err:
        read_vtab_task(tmp_path, "my_task", progress=False)
    assert str(err.value).startswith(f"{d / 'val200.txt'}:4:")
    t = read_vtab_task(tmp_path, "my_task", on_bad_line="skip", progress=False)
    assert t.num_classes == 6 and 99 not in t.labels.tolist()
    assert [(Path(b.file).name, b.line) for b in t.skipped] == [("val200.txt", 4)]


@pytest.mark.parametrize("labels, bad_line", [([0, 1, 3], 3), ([1, 2, 3], 1)])
def test_unknown_task_class_missing_from_train800_breaks_later_labels(tmp_path, labels, bad_line):
    d = make_task(tmp_path, "my_task", labels=labels)
    with pytest.raises(DataError) as err:
        read_vtab_task(tmp_path, "my_task", progress=False)
    assert str(err.value).startswith(f"{d / 'train800.txt'}:{bad_line}: label {labels[bad_line - 1]} breaks")


def test_num_classes_override_wins_for_known_and_unknown_tasks(tmp_path):
    make_task(tmp_path, "my_task", labels=[4, 0, 1])  # classes 2 and 3 absent from train800: allowed when told
    t = read_vtab_task(tmp_path, "my_task", progress=False, num_classes={"my_task": 7})
    assert t.num_classes == 7
    d = make_task(tmp_path, "cifar100")  # looked up under any spelling of the task
    assert read_vtab_task(tmp_path, "cifar", progress=False, num_classes={"cifar100": 3}).num_classes == 3
    set_line(d, "test.txt", 3, "images/test/000002.jpg 5")
    with pytest.raises(DataError, match=r"test.txt:3: label 5 beyond prepare.num_classes\[cifar\] = 3"):
        read_vtab_task(tmp_path, "cifar", progress=False, num_classes={"cifar": 3})


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


def test_union_label_disagreement_is_a_warning_naming_the_line(tmp_path):
    d = make_task(tmp_path, "cifar")
    set_line(d, "train800val200.txt", 4, "images/val/000000.jpg 2")
    t = read_vtab_task(tmp_path, "cifar", progress=False)  # error mode: still no stop
    assert [str(w) for w in t.warnings] == [
        f"{d / 'train800val200.txt'}:4: images/val/000000.jpg labelled 2 here but 0 at {d / 'val200.txt'}:1"]
    assert t.counts() == {"train": 3, "val": 3, "test": 3}


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


# ------------------------------------------------------------- the layout get_vtab1k.py writes, as in the wild


def test_get_vtab1k_layout_imports_with_copies_matched_by_content(tmp_path):
    """The folder every user downloads: train800val200.txt names renumbered copies (issue 12: exit 2 before)."""
    d = write_get_vtab1k_task(tmp_path, "dtd", train=8, val=4, test=4)
    assert (d / "train800val200.txt").read_text().splitlines()[0].startswith("images/train800val200/000000.jpg ")
    t = read_vtab_task(tmp_path, "dtd", progress=False)
    assert t.counts() == {"train": 8, "val": 4, "test": 4} and not t.warnings and not t.skipped
    assert t.union == {"present": True, "lines": 12, "matched_by_path": 0, "matched_by_bytes": 12,
                       "matched_by_pixels": 0, "unmatched": 0, "warnings": 0}
    assert t.paths[0] == "images/train800/000000.jpg" and t.paths[-1] == "images/test/000003.jpg"


def _relabel(d: Path, line: int, label: int) -> None:
    rel = (d / "train800val200.txt").read_text().splitlines()[line - 1].split()[0]
    set_line(d, "train800val200.txt", line, f"{rel} {label}")


def _reencode(d: Path, quality: int | None = None, fmt: str = "JPEG") -> None:
    for p in sorted((d / "images/train800val200").iterdir()):
        with Image.open(p) as im:
            im.load()
            im.save(p, format=fmt, **({"quality": quality} if quality else {}))


def _drop_last(d: Path) -> None:
    lines = (d / "train800val200.txt").read_text().splitlines()
    (d / "train800val200.txt").write_text("\n".join(lines[:-1]) + "\n")


UNION_CASES = {
    # name: (change to the union, expected warnings as (line, text in it), how lines matched)
    "other-label": (lambda d: _relabel(d, 10, 3), [(10, "labelled 3 here but 1 at")], "matched_by_bytes"),
    "missing-copy": (lambda d: (d / "images/train800val200/000002.jpg").unlink(), [(3, "image not found")],
                     "matched_by_bytes"),
    "other-count": (_drop_last, [(11, "lists 11 images; train800.txt + val200.txt list 12")], "matched_by_bytes"),
    "png-copies": (lambda d: _reencode(d, fmt="PNG"), [], "matched_by_pixels"),  # same pixels, other bytes
    "reencoded-copies": (lambda d: _reencode(d, quality=30), [], "unmatched"),  # size + labels still agree
    "reencoded-other-label": (lambda d: (_reencode(d, quality=30), _relabel(d, 2, 3)),
                              [(2, "label counts differ")], "unmatched"),
}


@pytest.mark.parametrize("case", UNION_CASES)
def test_union_disagreements_are_warnings_never_stops(tmp_path, case):
    d = write_get_vtab1k_task(tmp_path, "dtd", train=8, val=4, test=4)
    change, expected, matched = UNION_CASES[case]
    change(d)
    t = read_vtab_task(tmp_path, "dtd", progress=False)
    assert t.counts() == {"train": 8, "val": 4, "test": 4} and not t.skipped
    assert [w.line for w in t.warnings] == [line for line, _ in expected]
    for w, (_, text) in zip(t.warnings, expected):
        assert w.file == str(d / "train800val200.txt") and text in w.reason
    assert t.union[matched] >= 11


def test_wild_folder_grayscale_rgba_png_crlf_blank_lines_spaces(tmp_path):
    """What VTAB folders built outside the project hold: every line below imports, none is dropped."""
    d = write_get_vtab1k_task(tmp_path, "smallnorb_azimuth", train=18, val=4, test=4, num_classes=18,
                              channels=1)  # grayscale JPEGs, an alias folder name
    Image.new("RGBA", (16, 16), (9, 8, 7, 100)).save(d / "images/test/rgba image.png")
    test_lines = (d / "test.txt").read_text().splitlines()
    test_lines[0] = "images/test/rgba image.png\t\t 0  "  # a path with a space, tabs, trailing spaces
    text = "\ufeff" + "\r\n".join(test_lines) + "\r\n\r\n\n"  # BOM, CRLF, trailing blank lines
    (d / "test.txt").write_bytes(text.encode("utf-8"))
    (d / "val200.txt").write_text("\n".join("  " + ln.replace(" ", "   ") for ln in
                                            (d / "val200.txt").read_text().splitlines()) + "\n\n")
    t = read_vtab_task(tmp_path, "smallnorb_azi", progress=False)
    assert (t.name, t.num_classes) == ("smallnorb_azi", 18)
    assert t.counts() == {"train": 18, "val": 4, "test": 4} and not t.skipped and not t.warnings
    i = t.paths.index("images/test/rgba image.png")
    with Image.open(io.BytesIO(t.images[i])) as im:
        assert (im.mode, im.getpixel((0, 0))) == ("RGB", (9, 8, 7))
    with Image.open(io.BytesIO(t.images[0])) as im:
        assert im.mode == "RGB"  # the grayscale JPEG, converted


def test_every_real_task_name_and_spelling_finds_its_folder(tmp_path):
    for name in VTAB_NUM_CLASSES:
        (tmp_path / name).mkdir()
        assert find_task_folder(tmp_path, name) == tmp_path / name
    assert len(VTAB_NUM_CLASSES) == 19
    for alias, canonical in VTAB_ALIASES.items():
        assert canonical in VTAB_NUM_CLASSES, alias


def test_prepare_stage_imports_the_get_vtab1k_layout(tmp_path, capsys):
    write_get_vtab1k_task(tmp_path / "vtab", "cifar", train=8, val=4, test=4)
    write_get_vtab1k_task(tmp_path / "vtab", "my_task", train=6, val=3, test=3, num_classes=3)
    args = _prepare_args(tmp_path, "base.tasks=[cifar100, my_task]", "prepare.num_classes={my_task: 5}")
    assert prepare_main(args) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "outputs/prepare/summary.json").read_text())
    assert summary["tasks"]["cifar"]["counts"] == {"train": 8, "val": 4, "test": 4}
    assert summary["tasks"]["cifar"]["train800val200"]["matched_by_bytes"] == 12
    assert summary["tasks"]["my_task"]["num_classes"] == 5
    assert summary["warnings"] == {"cifar": [], "my_task": []}
