"""Small stage outputs (metrics.json, resolved configs, ...) replaced whole or not at all. The real interruption of
`dvc repro` during the train stage, and the resumed rerun, are tests/test_dvc_pipeline.py's first test (one
project serves both it and the whole-pipeline run)."""

from __future__ import annotations

import pytest


def test_small_outputs_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """metrics.json, resolved configs and the other small stage outputs go through write_text_atomic: a write
    that fails half way (here: the rename) leaves the previous file as it was and no temporary file."""
    from dynadapter import atomic
    from dynadapter.config import Params, save_resolved

    target = tmp_path / "metrics.json"
    atomic.write_text_atomic(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n'

    def killed(src, dst):
        raise KeyboardInterrupt  # what Ctrl-C between the write and the rename looks like

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_text_atomic(target, '{"a": 2, "b": "a much longer text that was never finished"}\n')
    with pytest.raises(KeyboardInterrupt):
        save_resolved(Params(), ["base"], tmp_path / "train_config.yaml")
    assert target.read_text() == '{"a": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
