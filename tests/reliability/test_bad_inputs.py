"""Bad inputs, refused or converted before any work: images of odd sizes, modes and formats in a VTAB-1k
folder, empty splits, odd list files, params.yaml mistakes, and wrong inputs to the served model.

Already covered elsewhere (not repeated here): bad list lines, labels beyond a known task's classes, CRLF
list files, L/RGBA/P/I;16/BMP images (tests/test_data_vtab.py); stored labels outside the manifest's classes
(tests/test_data_store.py::test_label_outside_class_range_is_rejected); tune-section mistakes
(tests/test_tune.py::test_tune_config_errors_name_the_key); a stage stopping on base.budget / a typo
(tests/test_pipelines.py::test_params_mistake_stops_stage_naming_the_key); served images of the wrong
shape, dtype, range or with NaN (tests/test_tracking.py::test_bad_inputs_raise_clear_errors,
test_pyfunc_rejects_bad_shape_and_dtype)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dynadapter.config import ConfigError, ModelConfig, apply_overrides, load_params
from dynadapter.data import load_split_tensors, read_manifest
from dynadapter.data.store import DataError, write_task
from dynadapter.data.vtab import import_vtab, read_vtab_task
from dynadapter.inference import measure_stage_costs
from dynadapter.models import build_model
from dynadapter.serving import load_bundle, save_bundle
from helpers import backbone_cfg, one_thread, tiny_model  # noqa: F401
from test_data_vtab import make_task, set_line

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------ VTAB-1k images


def _img(mode: str, size=(6, 6), color=None) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(np.full(size[::-1], 32896 if color is None else color, dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(np.full(size[::-1], 1000 if color is None else color, dtype=np.int32))
    default = {"RGB": (10, 200, 30), "RGBA": (10, 200, 30, 40), "L": 77, "LA": (100, 20), "1": 1,
               "CMYK": (0, 0, 0, 0)}[mode]
    return Image.new(mode, size, default if color is None else color)


IMAGE_CASES = [  # file name, mode, format, save options, size -> stored RGB pixel (None: lossy, not checked)
    ("a.webp", "RGB", "WEBP", {"lossless": True}, (6, 6), (10, 200, 30)),
    ("b.webp", "RGBA", "WEBP", {"lossless": True}, (6, 6), (10, 200, 30)),  # alpha dropped
    ("c.tif", "RGB", "TIFF", {}, (6, 6), (10, 200, 30)),
    ("d.tif", "I;16", "TIFF", {}, (6, 6), (128, 128, 128)),  # 16-bit scaled to 8
    ("e.tif", "I", "TIFF", {}, (6, 6), (4, 4, 4)),  # 32-bit ints above 255: read as 16-bit
    ("f.jpg", "L", "JPEG", {}, (6, 6), (77, 77, 77)),  # grayscale JPEG
    ("g.jpg", "CMYK", "JPEG", {}, (6, 6), None),
    ("h.png", "1", "PNG", {}, (6, 6), (255, 255, 255)),
    ("i.png", "LA", "PNG", {}, (6, 6), (100, 100, 100)),
    ("j.ppm", "RGB", "PPM", {}, (6, 6), (10, 200, 30)),
    ("k.png", "RGB", "PNG", {}, (1, 1), (10, 200, 30)),  # a single pixel
    ("l.png", "RGB", "PNG", {}, (300, 4), (10, 200, 30)),  # a 75:1 strip
]


def test_odd_modes_formats_and_sizes_are_stored_as_rgb_and_load_at_model_size(tmp_path):
    """Every case goes into one task's train split; the stored bytes are RGB PNG, and the split loads as
    float32 [N, 3, 16, 16] for a 16-pixel model whatever the files' sizes."""
    d = make_task(tmp_path / "vtab", "cifar", n=len(IMAGE_CASES))
    lines = []
    for i, (name, mode, fmt, opts, size, _) in enumerate(IMAGE_CASES):
        _img(mode, size).save(d / "images" / "train" / name, format=fmt, **opts)
        lines.append(f"images/train/{name} {i % 10}")
    (d / "train800.txt").write_text("\n".join(lines) + "\n")
    (d / "train800val200.txt").unlink()
    [report] = import_vtab(tmp_path / "vtab", ["cifar"], tmp_path / "data", progress=False)
    assert report.counts["train"] == len(IMAGE_CASES) and not report.skipped
    t = read_vtab_task(tmp_path / "vtab", "cifar", progress=False)
    for (name, mode, fmt, _, size, rgb), data in zip(IMAGE_CASES, t.images):
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", size), name
            if rgb is not None:
                assert im.getpixel((0, 0)) == rgb, name
    assert read_manifest(tmp_path / "data", "cifar")["image_size"] is None  # mixed sizes: recorded as such
    x, y = load_split_tensors(tmp_path / "data", "cifar", "train", 16)
    assert x.shape == (len(IMAGE_CASES), 3, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_decompression_bomb_is_rejected_naming_file_and_line(tmp_path, monkeypatch):
    d = make_task(tmp_path, "dtd")
    Image.new("RGB", (40, 40)).save(d / "images/val/000001.jpg", format="JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 1600 pixels > 2 x the limit: PIL refuses it
    with pytest.raises(DataError) as err:
        read_vtab_task(tmp_path, "dtd", progress=False)
    expected = f"{d / 'val200.txt'}:2: unreadable or unconvertible image 000001.jpg (DecompressionBombError"
    assert expected in str(err.value)


# ------------------------------------------------------------------------------------------ splits and list files


def test_split_left_empty_by_skipped_lines_is_an_error(tmp_path):
    d = make_task(tmp_path, "dtd")
    for line in (1, 2, 3):
        set_line(d, "val200.txt", line, f"images/val/{line - 1:06d}.jpg 999")  # beyond dtd's 47 classes
    with pytest.raises(DataError, match=rf"{d / 'val200.txt'}: no valid lines left after skipping 3 bad line"):
        read_vtab_task(tmp_path, "dtd", on_bad_line="skip", progress=False)


def test_reading_an_empty_stored_split_names_task_and_split(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, format="PNG")
    write_task(tmp_path, "toy", [png.getvalue()] * 2, [0, 1], ["train", "val"], 2, source="test")
    with pytest.raises(DataError, match=rf"{tmp_path / 'toy'}: split 'test' is empty"):
        load_split_tensors(tmp_path, "toy", "test", 16)


LIST_FILE_CASES = {  # how the list files are written -> expected outcome (None: read as the plain file)
    "crlf-with-bom": (lambda text: ("\ufeff" + text.replace("\n", "\r\n")).encode("utf-8"), None),
    "old-mac-cr": (lambda text: text.replace("\n", "\r").encode(), None),
    "tabs-and-trailing-spaces": (lambda text: text.replace(" ", "\t").replace("\n", "  \n").encode(), None),
    "windows-backslash-paths": (lambda text: text.replace("/", "\\").encode(), None),
    "utf-16": (lambda text: text.encode("utf-16"), "not a UTF-8 text file"),
}


@pytest.mark.parametrize("case", LIST_FILE_CASES)
def test_list_files_from_other_editors(tmp_path, case):
    encode, error = LIST_FILE_CASES[case]
    d = make_task(tmp_path, "dtd", union=False)
    reference = read_vtab_task(tmp_path, "dtd", progress=False)
    for name in ("train800.txt", "val200.txt", "test.txt"):
        (d / name).write_bytes(encode((d / name).read_text()))
    if error:
        with pytest.raises(DataError, match=rf"{d / 'train800.txt'}: {error}"):
            read_vtab_task(tmp_path, "dtd", progress=False)
        return
    t = read_vtab_task(tmp_path, "dtd", progress=False)
    assert t.paths == reference.paths and t.labels.tolist() == reference.labels.tolist()
    assert t.images == reference.images


# ------------------------------------------------------------------------------------------ params.yaml


PARAMS_MISTAKES = [  # dotted key -> value written into params.yaml, the key the message names, its words
    ("trian.epochs", 3, "trian", "unknown section"),
    ("train.lerning_rate", 0.1, "train.lerning_rate", "unknown key"),
    ("base.backbone.overides", {"depth": 4}, "base.backbone.overides", "unknown key"),
    ("base.budget", 0.0, "base.budget", "greater than 0"),
    ("base.budget", 1.01, "base.budget", "less than or equal to 1"),
    ("base.budget", -0.5, "base.budget", "greater than 0"),
    ("base.model.exits", [3, 6, 9, 13], "model.exits", "beyond the backbone depth 12"),
    ("base.model.exits", [6, 3, 9, 12], "base.model.exits", "strictly increasing"),
    ("base.model.exits", [3, 3, 12], "base.model.exits", "strictly increasing"),
    ("base.model.exits", [0, 6, 12], "base.model.exits", "strictly increasing"),
    ("base.model.exits", [], "base.model.exits", "at least one"),
    ("train.lr", -1e-3, "train.lr", "greater than 0"),
    ("train.weight_decay", -0.1, "train.weight_decay", "greater than or equal to 0"),
    ("train.distill", -1, "train.distill", "greater than or equal to 0"),
    ("train.sparsity.p_max", -0.1, "train.sparsity.p_max", "greater than or equal to 0"),
    ("train.sparsity.q", -0.2, "train.sparsity.q", "greater than or equal to 0"),
    ("train.sparsity.q", 1.0, "train.sparsity.q", "less than 1"),
    ("train.sparsity.p_max", 1.0, "train.sparsity.p_max", "less than 1"),
    ("train.sparsity.p_min", 1.5, "train.sparsity.p_min", "less than 1"),
    ("train.sparsity.p_min", 0.3, "train.sparsity", "p_min (0.3) must not exceed p_max"),
    ("train.priority.start", [1.0, -1.0, 1.0, 1.0], "train.priority.start", ">= 0"),
    ("train.epochs", "ten", "train.epochs", "valid integer"),
    ("train.batch_size", 0, "train.batch_size", "greater than 0"),
    ("pretrain.lr", 0, "pretrain.lr", "greater than 0"),
    ("tune.search_space.q", [0.0, 1.0], "tune.search_space.q", "must lie in [0.0, 1.0)"),
    ("tune.num_samples", 0, "tune.num_samples", "greater than 0"),
    ("base.tasks", "count", "base.tasks", "valid list"),
]


@pytest.mark.parametrize("key, value, named, words", PARAMS_MISTAKES, ids=[f"{k}={v}" for k, v, *_ in PARAMS_MISTAKES])
def test_params_yaml_mistake_is_rejected_naming_the_key(tmp_path, key, value, named, words):
    """The project's params.yaml with one mistake, read as a stage reads it: refused before any work, the
    file, the key and the reason in the message."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["base"]["backbone"].setdefault("overrides", {})["depth"] = 12  # the depths and ratios the cases
    raw["train"].setdefault("sparsity", {})["p_max"] = 0.2  # assume, whatever the file says
    path = tmp_path / "params.yaml"
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    path.write_text(yaml.safe_dump(apply_overrides(raw, [f"{key}={text}"])))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and named in message and words in message, message


def test_params_yaml_itself_is_valid_and_a_syntax_error_names_the_file(tmp_path):
    load_params(REPO / "params.yaml")
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  seed: [1\n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid YAML"):
        load_params(path)
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'nope.yaml'}: file not found"):
        load_params(tmp_path / "nope.yaml")


def test_exits_beyond_a_default_depth_are_refused_when_the_model_is_built():
    """With the depth left to timm's default (not in base.backbone.overrides), params cannot know it: the
    model factory refuses the exits before any training, naming the key."""
    cfg = backbone_cfg()
    cfg.overrides.pop("depth")  # the timm default for vit_tiny_patch16_224: 12 blocks
    with pytest.raises(ValueError, match=r"base\.model\.exits \[3, 6, 13\] go beyond the backbone depth 12"):
        build_model(cfg, ModelConfig(exits=[3, 6, 13]), num_classes=3)


# ------------------------------------------------------------------------------------------ served model


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    model = tiny_model(num_classes=3).eval()
    bundle = save_bundle(model, tmp_path_factory.mktemp("bundle") / "b", backbone_cfg=backbone_cfg(),
                         model_cfg=ModelConfig(), costs=measure_stage_costs(model), curve=[], budget=0.5)
    return load_bundle(bundle)


def _px(*shape, dtype=np.float32):
    return np.random.default_rng(0).random(shape).astype(dtype)


EXPECTED = r"expected float32 images of shape \(-1, 3, 16, 16\) with values in \[0, 1\]"
SERVING_CASES = {  # input -> what the message says after the contract
    "nested-list": (lambda: _px(2, 3, 16, 16).tolist(), "got list"),
    "string": (lambda: "a.png", "got str"),
    "none": (lambda: None, "got NoneType"),
    "one-image-no-batch-axis": (lambda: _px(3, 16, 16), r"got shape \(3, 16, 16\)"),
    "channels-last": (lambda: _px(2, 16, 16, 3), r"got shape \(2, 16, 16, 3\)"),
    "grayscale": (lambda: _px(2, 1, 16, 16), r"got shape \(2, 1, 16, 16\)"),
    "rgba": (lambda: _px(2, 4, 16, 16), r"got shape \(2, 4, 16, 16\)"),
    "5-d": (lambda: _px(1, 2, 3, 16, 16), r"got shape \(1, 2, 3, 16, 16\)"),
    "float16": (lambda: _px(2, 3, 16, 16, dtype=np.float16), "got dtype float16"),
    "int64-pixels": (lambda: (_px(2, 3, 16, 16) * 255).astype(np.int64), "got dtype int64"),
    "bool": (lambda: _px(2, 3, 16, 16) > 0.5, "got dtype bool"),
    "object": (lambda: _px(2, 3, 16, 16).astype(object), "got dtype object"),
    "torch-bfloat16": (lambda: torch.rand(2, 3, 16, 16).bfloat16(), r"got dtype torch\.bfloat16"),
    "torch-uint8": (lambda: torch.zeros(2, 3, 16, 16, dtype=torch.uint8), r"got dtype torch\.uint8"),
    "normalised-negative": (lambda: _px(2, 3, 16, 16) - 0.5, r"got values in \[-0\.5"),
    "infinite": (lambda: np.full((1, 3, 16, 16), np.inf, np.float32), "NaN or infinite"),
}


@pytest.mark.parametrize("case", SERVING_CASES)
def test_served_model_refuses_bad_images_with_the_contract(predictor, case):
    make, got = SERVING_CASES[case]
    with pytest.raises(ValueError, match=f"{EXPECTED}.*{got}"):
        predictor.predict(make())


@pytest.mark.parametrize("params, message", [
    ({"thresholds": ["high"] * 4}, "could not convert string to float"),
    ({"thresholds": [float("inf")] * 4}, "thresholds must be finite"),
    ({"budget": float("nan")}, "budget must be a finite fraction"),
    ({"budget": -0.5}, "budget must be a finite fraction"),
])
def test_served_model_refuses_bad_parameters(predictor, params, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(_px(2, 3, 16, 16), **params)


def test_served_model_accepts_the_edge_cases_of_the_contract(predictor):
    empty = predictor.predict(np.zeros((0, 3, 16, 16), np.float32))
    assert all(v.shape == (0,) for v in empty.values())
    x = _px(3, 3, 16, 16)
    ref = predictor.predict(x)
    for same in (torch.from_numpy(x), np.asfortranarray(x), np.clip(x + 5e-4, 0, 1 + 5e-4)):
        out = predictor.predict(same)
        assert out["prediction"].shape == (3,)
    assert np.array_equal(predictor.predict(torch.from_numpy(x))["prediction"], ref["prediction"])
