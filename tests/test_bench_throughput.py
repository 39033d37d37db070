"""bench/throughput_by_batch.py's replay of a trained model's exits on another geometry (issue 25)."""

from __future__ import annotations

import pytest
import torch

from dynadapter.inference import run_dynamic
from helpers import images, load_bench, sharpen_heads, tiny_model


@pytest.mark.parametrize("target_counts", [[10, 6, 4, 4], [0, 12, 0, 12], [3, 0, 0, 21], [0, 0, 0, 24]])
def test_replayed_thresholds_send_as_many_images_to_each_exit_as_the_target(target_counts):
    """The geometry replay is only a fair comparison if f is the same: every exit must get exactly the target's
    count of images through the real forward_dynamic, including exits nobody leaves at."""
    bench = load_bench("throughput_by_batch")
    model = tiny_model().eval()
    sharpen_heads(model)
    x = images(sum(target_counts))
    target = torch.repeat_interleave(torch.arange(4), torch.tensor(target_counts))
    thresholds = bench.replay_thresholds(model, x, target[torch.randperm(target.numel())])
    exits = run_dynamic(model, x, thresholds)[1]
    assert torch.bincount(exits, minlength=4).tolist() == target_counts
    assert all(t > 1.0 for t, k in zip(thresholds, target_counts[:-1]) if k == 0)  # skipped heads, not run
