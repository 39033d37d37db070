"""Contracts of the cost side of dynadapter.inference (flops.py, runtime.py): MACs are silent exact integers that
match both the closed form of a plain ViT and what `forward_dynamic` really executes (an early head with a
threshold of exactly 1 still runs and is still paid for), stage costs are measured with a probe of the model's
own dtype and device (including `meta`) and reject malformed input with a clear message, `dynamic_macs` takes any
integer index tensor and a single sample, and the throughput helpers time every call of the function on the very
batch given (defaults: 1 warm-up and 5 timed calls), count images along dim 0, interleave the functions compared,
and wait for an accelerator's queue on both sides of each timed call. Clocks and accelerator syncs are faked, so
no assertion depends on the speed of the machine."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import dynadapter.inference.runtime as runtime
from dynadapter.inference import (
    StageCosts,
    compare_throughput,
    count_macs,
    dynamic_macs,
    dynamic_vs_full,
    measure_stage_costs,
    measure_throughput,
    unfused_attention,
    vit_macs_closed_form,
)
from helpers import images, one_thread, tiny_model  # noqa: F401

# ------------------------------------------------------------------------------------------------- MACs


def test_count_macs_is_a_silent_integer_that_sees_keyword_arguments(capsys):
    lin = nn.Linear(32, 5)
    x = torch.zeros(1, 32)

    def twice_or_more(inp, times=1):
        for _ in range(times):
            lin(inp)

    macs = count_macs(twice_or_more, x, times=3)
    assert macs == 3 * 32 * 5  # keyword arguments reach fn
    assert type(macs) is int  # logged as an integer count, never 480.0
    assert capsys.readouterr().out == ""  # no FlopCounterMode table on stdout


def test_stage_costs_need_one_head_per_stage():
    with pytest.raises(ValueError, match=r"need one head per stage, got 2 stages and 1 heads"):
        StageCosts(embed=1, stages=[10, 20], heads=[1])
    with pytest.raises(ValueError, match=r"need one head per stage, got 0 stages and 0 heads"):
        StageCosts(embed=1, stages=[], heads=[])  # a model without any exit has no cost to report


def test_thresholds_must_come_one_per_exit():
    costs = StageCosts(embed=7, stages=[10, 20, 30], heads=[1, 2, 3])
    with pytest.raises(ValueError, match=r"need 3 thresholds \(one per exit\), got 2"):
        costs.cumulative([0.5, 0.5])
    with pytest.raises(ValueError, match=r"need 3 thresholds \(one per exit\), got 4"):
        dynamic_macs(costs, [0, 1], torch.tensor([0.5, 0.5, 0.5, 0.5]))


@pytest.mark.parametrize("thresholds", [
    [1.0, 1.0, 1.0, 1.0],  # exactly the largest confidence: can be met, so every head runs
    [1.0, 1.5, 1.0, 2.0],  # only the head of exit 1 is unreachable
    [1.5, 1.5, 1.5, 1.5],  # nobody can leave early: the full-depth baseline
])
def test_cost_model_charges_exactly_the_heads_forward_dynamic_runs(thresholds):
    """The MACs a sample is charged for when it leaves at the last exit are the MACs `forward_dynamic` executes
    for it, including at the boundary threshold 1.0 (a confidence of exactly 1 may leave, so that head runs)."""
    model = tiny_model("adapter", num_classes=5).eval()  # fresh heads: confidence far below 1, all go to the end
    costs = measure_stage_costs(model)
    x = images(1, seed=2)
    assert model.forward_dynamic(x, thresholds).exit_index.tolist() == [3]
    with unfused_attention(model):
        executed = count_macs(model.forward_dynamic, x, thresholds)
    assert costs.cumulative(thresholds)[-1] == executed
    assert dynamic_macs(costs, [3], thresholds) == executed
    if min(thresholds[:-1]) > 1.0:
        assert executed == costs.full_depth_baseline()


def test_measure_stage_costs_probes_with_the_models_dtype_and_device():
    """The default probe follows the model: a float64 model and a `meta` model (measured without computing
    anything) cost what the float32 CPU model costs."""
    model = tiny_model("adapter", num_classes=5)
    reference = measure_stage_costs(model)
    assert measure_stage_costs(copy.deepcopy(model).double()) == reference
    assert measure_stage_costs(copy.deepcopy(model).to("meta")) == reference


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_costs_of_a_cuda_model_and_of_cuda_exit_indices():
    """On a GPU the default probe is made on the model's device, and the exit indices `forward_dynamic` returns
    there can be priced directly (the CPU run cannot tell `device=None` from the right device)."""
    model = tiny_model("adapter", num_classes=5)
    reference = measure_stage_costs(model)
    on_gpu = copy.deepcopy(model).cuda()
    assert measure_stage_costs(on_gpu) == reference
    thresholds = [0.0, 2.0, 2.0, 2.0]  # everybody leaves at the first exit
    exits = on_gpu.forward_dynamic(images(5).cuda(), thresholds).exit_index
    assert exits.is_cuda and dynamic_macs(reference, exits, thresholds) == reference.cumulative(thresholds)[0]


def test_measure_stage_costs_rejects_a_batch_probe():
    model = tiny_model("adapter", num_classes=5)
    with pytest.raises(ValueError, match=r"expects a 1-image probe, got batch 2"):
        measure_stage_costs(model, images(2))


def test_dynamic_macs_takes_any_integer_index_and_a_single_sample():
    costs = StageCosts(embed=7, stages=[10, 20, 30], heads=[1, 2, 3])
    cum = costs.cumulative()  # [18, 40, 73]
    assert dynamic_macs(costs, [2]) == 73.0  # one sample is enough
    assert dynamic_macs(costs, torch.tensor([1])) == 40.0
    # exit indices kept compactly (uint8 would otherwise index as a boolean mask) give the same mean
    assert dynamic_macs(costs, torch.tensor([0, 1, 2], dtype=torch.uint8)) == pytest.approx(sum(cum) / 3)
    with pytest.raises(ValueError) as err:
        dynamic_macs(costs, [])
    assert str(err.value) == "dynamic_macs needs at least one sample"


def test_closed_form_defaults_describe_an_imagenet_vit():
    """Defaults: 1000 classes, one class token, 3 channels; ViT-B/16 at 224 px is the field's 17.58 G MACs."""
    b16 = vit_macs_closed_form(224, 16, 768, 12)
    assert b16 == vit_macs_closed_form(224, 16, 768, 12, mlp_ratio=4.0, num_classes=1000, num_prefix_tokens=1,
                                       in_chans=3)
    assert abs(b16 - 17.58e9) < 0.002 * 17.58e9


@pytest.mark.parametrize("img_size,num_classes", [(16, 5), (16, 10), (20, 5), (24, 3)])
def test_closed_form_equals_measured_macs_exactly(img_size, num_classes):
    """A plain cls-token ViT costs exactly the closed form, head included (D·C), also when the image is not a
    multiple of the patch (20 px, 8 px patches: the patchify conv keeps 2x2 patches)."""
    model = tiny_model("linear_probe", early_exit=False, num_classes=num_classes, img_size=img_size)
    measured = measure_stage_costs(model).full_depth_baseline()
    closed = vit_macs_closed_form(img_size, 8, 32, 4, num_classes=num_classes)
    assert type(closed) is int and closed == measured


# ---------------------------------------------------------------------------------------------- runtime


class FakeClock:
    """`time.perf_counter` stand-in: the functions being timed advance it by scripted durations."""

    def __init__(self, events: list | None = None):
        self.now, self.events = 0.0, events if events is not None else []

    def perf_counter(self) -> float:
        self.events.append("clock")
        return self.now


def scripted(clock: FakeClock, durations: list[float], name: str = "fn"):
    """A function to time: each call logs (name, its argument, grad mode) and takes the next duration."""
    todo, calls = iter(durations), []

    def fn(inp):
        calls.append((inp, torch.is_grad_enabled()))
        clock.events.append(name)
        clock.now += next(todo)

    return fn, calls


def test_measure_throughput_times_fn_on_the_batch_after_one_warmup(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(runtime, "time", clock)
    x = torch.zeros(6, 3)  # 6 images, 3 features: images are counted along dim 0
    fn, calls = scripted(clock, [100.0, 0.5, 0.1, 0.3, 9.0, 0.2])  # the 100 s warm-up is not timed
    assert measure_throughput(fn, x) == pytest.approx(6 / 0.3)  # defaults: 1 warm-up, median of 5
    assert len(calls) == 6 and all(inp is x and not grad for inp, grad in calls)

    fn, calls = scripted(clock, [7.0, 0.25])
    assert measure_throughput(fn, x, repeats=1) == pytest.approx(6 / 0.25)  # a single timed call is allowed
    assert [inp is x for inp, _ in calls] == [True, True]


def test_compare_throughput_interleaves_the_functions_and_counts_images(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(runtime, "time", clock)
    x = torch.zeros(6, 3)
    fa, calls_a = scripted(clock, [50.0, 1.0, 2.0, 3.0, 4.0, 100.0], "a")
    fb, calls_b = scripted(clock, [50.0, 0.1, 0.3, 0.2, 0.5, 0.4], "b")
    ips = compare_throughput({"a": fa, "b": fb}, x)
    assert ips == pytest.approx({"a": 6 / 3.0, "b": 6 / 0.3})  # medians of 5 timed calls, warm-up excluded
    calls = [e for e in clock.events if e != "clock"]
    assert calls == ["a", "b"] * 6  # 1 warm-up + 5 timed rounds, a and b interleaved
    assert all(inp is x and not grad for inp, grad in calls_a + calls_b)

    fa, _ = scripted(clock, [1.0, 0.5], "a")
    assert compare_throughput({"a": fa}, x, repeats=1) == pytest.approx({"a": 12.0})
    for repeats in (0, -2):
        with pytest.raises(ValueError, match=f"repeats must be >= 1, got {repeats}"):
            compare_throughput({"a": fa}, x, repeats=repeats)


@pytest.mark.parametrize("device,sync", [("cuda:1", "cuda"), ("mps", "mps"), ("cpu", None)])
def test_timed_calls_wait_for_the_accelerator(monkeypatch, device, sync):
    """Kernels run asynchronously on GPUs: the clock starts after and stops after a sync of the batch's device,
    or the figure measures the launch, not the work. CPU batches need (and get) no sync."""
    events: list = []
    clock = FakeClock(events)
    monkeypatch.setattr(runtime, "time", clock)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda dev=None: events.append(("cuda", dev)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: events.append(("mps", None)))
    batch = SimpleNamespace(shape=(4, 3, 16, 16), device=torch.device(device))  # only shape and device are read
    fn, _ = scripted(clock, [0.0, 2.0, 2.0])
    assert measure_throughput(fn, batch, repeats=2, warmup=1) == pytest.approx(2.0)
    mark = {"cuda": ("cuda", torch.device("cuda", 1)), "mps": ("mps", None)}.get(sync)
    timed = [mark, "clock", "fn", mark, "clock"] if mark else ["clock", "fn", "clock"]
    assert events == ["fn"] + timed * 2  # the warm-up call is not timed


def test_dynamic_vs_full_runs_each_path_as_often_as_asked(monkeypatch):
    model = tiny_model("adapter", num_classes=5)  # default thresholds 2.0: every sample goes to the last exit
    counts = {"dynamic": 0, "full": 0}
    original_dynamic, original_full = model.forward_dynamic, runtime.full_depth_forward

    def dynamic(inp, thresholds=None):
        counts["dynamic"] += 1
        return original_dynamic(inp, thresholds)

    def full(m, inp):
        counts["full"] += 1
        return original_full(m, inp)

    model.forward_dynamic = dynamic
    monkeypatch.setattr(runtime, "full_depth_forward", full)
    x = images(1, seed=1)  # a single image: its exit is the whole batch

    cmp = dynamic_vs_full(model, x)
    assert counts == {"dynamic": 1 + 5 + 1, "full": 1 + 5}  # defaults: 1 warm-up, 5 timed; one more to count exits
    assert cmp.batch_size == 1 and cmp.exit_fraction == [0.0, 0.0, 0.0, 1.0]

    counts.update(dynamic=0, full=0)
    dynamic_vs_full(model, x, repeats=2, warmup=3)
    assert counts == {"dynamic": 3 + 2 + 1, "full": 3 + 2}
