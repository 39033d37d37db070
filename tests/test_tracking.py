"""Contracts of dynadapter.tracking and dynadapter.serving against a real MLflow (sqlite backend, registry):
nested runs under one parent, the logged dynamic model round trip, champion promotion, fast failures."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

import pickle  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from dynadapter.adapt import TaskData, TaskResult, Trained, evaluate_task  # noqa: E402
from dynadapter.config import ModelConfig, Params, PetlConfig  # noqa: E402
from dynadapter.inference import calibrate, collect_exit_logits, measure_stage_costs  # noqa: E402
from dynadapter.models import build_model, normalization  # noqa: E402
from dynadapter.serving import load_bundle, save_bundle  # noqa: E402
from dynadapter.tracking import (  # noqa: E402
    CHAMPION,
    PARENT_TAG,
    TAG_MODEL_URI,
    V_DECISION,
    TrackingUnavailableError,
    check_tracking_server,
    find_task_runs,
    log_dynamic_model,
    model_card,
    promise_of,
    log_params,
    log_task_result,
    model_uri_of,
    pipeline_run,
    promote,
    resolve_tracking_uri,
    task_run,
)
from helpers import backbone_cfg, one_thread, randomize_petl, sharpen_heads  # noqa: E402, F401
from registry_models import logged_model, predicted  # noqa: E402

TINY_VIT = dict(img_size=16, patch_size=8, embed_dim=24, depth=4, num_heads=2)
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One sqlite store for the module (creating the schema costs seconds); the fluent API points at it too,
    for `mlflow.pyfunc.load_model("models:/...")`."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def client(tracking_uri):
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 16, 16), dtype=np.float32)


def normalised(x: np.ndarray, model) -> torch.Tensor:
    """[0, 1] pixels as the pipeline feeds the model: (x - mean) / std of the backbone's pretrained config."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in normalization(model.backbone))
    return (torch.from_numpy(x) - mean) / std


@pytest.fixture(scope="module")
def evaluated():
    """A tiny merged Rep-Adapter model (so the bundle must rebuild a merged module tree), calibrated on val
    by the same `evaluate_task` the pipeline runs, with a made-up training history."""
    torch.manual_seed(0)
    bcfg = backbone_cfg(**TINY_VIT)
    mcfg = ModelConfig(petl=PetlConfig(method="rep_adapter"))
    model = build_model(bcfg, mcfg, NUM_CLASSES)
    randomize_petl(model, 0)
    sharpen_heads(model, 0, scale=6.0)
    model.eval()
    gen = torch.Generator().manual_seed(1)

    def split(n: int):
        return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen)

    data = TaskData(split(8), split(64), split(64), NUM_CLASSES)
    ev = evaluate_task(model, data, budget=0.5)
    history = [{"epoch": e, "train_loss": 1.0 / e, "val_acc": [0.3, 0.4, 0.5, 0.5 + e / 10], "lr": 1e-3}
               for e in (1, 2, 3)]
    trained = Trained(task="count", method="rep_adapter", early_exit=True, exits=list(model.exits),
                      params={"trainable": 100, "heads": 60, "petl": 40, "backbone": 1000}, best_epoch=3,
                      train_seconds=1.0, step_seconds=0.01, history=history)
    return dict(model=model, bcfg=bcfg, mcfg=mcfg, data=data, result=TaskResult(trained, ev),
                costs=measure_stage_costs(model))


# ------------------------------------------------------------------------------------------ tracking URI


@pytest.mark.parametrize("uri,expected", [
    ("sqlite:///mlflow.db", "sqlite:///{root}/mlflow.db"),
    ("sqlite:///sub/../runs/m.db", "sqlite:///{root}/runs/m.db"),
    ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("mlruns", "{root}/mlruns"),
])
def test_resolve_tracking_uri_is_independent_of_cwd(uri, expected, tmp_path, monkeypatch):
    root = tmp_path.resolve()
    monkeypatch.chdir("/")
    assert resolve_tracking_uri(uri, root) == expected.format(root=root)


def test_check_tracking_server_fails_fast_naming_the_uri():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    with pytest.raises(TrackingUnavailableError, match=uri):
        check_tracking_server(uri, timeout=2)
    assert time.perf_counter() - start < 10
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ or os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] != "0"


def test_check_tracking_server_sqlite(tmp_path):
    db = tmp_path / "nested" / "dir" / "m.db"
    check_tracking_server(f"sqlite:///{db}")
    assert db.is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrackingUnavailableError, match="file/m.db"):  # its folder would be a file
        check_tracking_server(f"sqlite:///{tmp_path / 'file' / 'm.db'}")


# --------------------------------------------------------------------------------------------- runs


def test_stages_share_one_parent_with_nested_task_runs(tracking_uri, client, evaluated):
    params = Params()
    with pipeline_run(tracking_uri, "exp-runs", "pipe-1", stage="train", config=params,
                      sections=["base", "train"]) as parent:
        for task in ("count", "digits"):
            with task_run(parent, task, stage="train", params={"train": params.train}) as run:
                log_task_result(run, evaluated["result"])
        with pytest.raises(RuntimeError), task_run(parent, "broken", stage="train"):
            raise RuntimeError("boom")
    with pipeline_run(tracking_uri, "exp-runs", "pipe-1", stage="evaluate", config=params,
                      sections=["base", "evaluate"]) as again:
        pass
    assert again.run_id == parent.run_id  # the second stage attached to the same parent
    assert pickle.loads(pickle.dumps(parent)) == parent  # handles travel to Ray workers

    parent_run = client.get_run(parent.run_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.params["base.backbone.name"] == params.base.backbone.name
    assert parent_run.data.params["evaluate.throughput_batch"] == str(params.evaluate.throughput_batch)
    assert parent_run.data.tags["dynadapter.stage_status.train"] == "FINISHED"
    parent_files = {f.path for f in client.list_artifacts(parent.run_id, "config")}
    assert parent_files == {"config/train.yaml", "config/evaluate.yaml"}

    children = find_task_runs(parent, stage="train", status=None)
    assert sorted(r.data.tags["dynadapter.task"] for r in children) == ["broken", "count", "digits"]
    assert all(r.data.tags[PARENT_TAG] == parent.run_id for r in children)
    assert {r.data.tags["dynadapter.task"]: r.info.status for r in children}["broken"] == "FAILED"

    count = find_task_runs(parent, stage="train", task="count")[0]
    ev = evaluated["result"].evaluated
    assert count.data.params["train.lr"] == str(params.train.lr)
    assert count.data.metrics["test_accuracy"] == pytest.approx(ev.test["accuracy"])
    assert count.data.metrics["val_accuracy"] == pytest.approx(ev.calibration["val_accuracy"])
    assert count.data.metrics["macs_full_depth_baseline_macs"] == ev.full_depth_macs
    for i, acc in enumerate(ev.test_exit_accuracy):
        assert count.data.metrics[f"test_acc_exit_{i}"] == pytest.approx(acc)
    history = client.get_metric_history(count.info.run_id, "val_acc_3")
    steps = sorted((m.step, round(m.value, 6)) for m in history)
    assert steps == [(1, 0.6), (2, 0.7), (3, 0.8)]
    files = {f.path for f in client.list_artifacts(count.info.run_id)}
    assert {"result.json", "curve.csv", "pareto.csv", "pareto.png", "stage_costs.json"} <= files
    pareto_csv = Path(client.download_artifacts(count.info.run_id, "pareto.csv"))
    assert pareto_csv.read_text().splitlines()[0].startswith("thresholds,val_accuracy")


def test_params_are_immutable_but_relogging_is_a_no_op(tracking_uri):
    with pipeline_run(tracking_uri, "exp-runs", "pipe-params", stage="s") as parent, \
            task_run(parent, "t", stage="s") as run:
        assert log_params(run, {"a": {"b": 1, "c": [1, 2]}}) == {"a.b": "1", "a.c": "[1, 2]"}
        assert log_params(run, {"a": {"b": 1}}) == {}
        with pytest.raises(ValueError, match="a.b"):
            log_params(run, {"a": {"b": 2}})


# ------------------------------------------------------------------------------------ model round trip


@pytest.fixture(scope="module")
def registered(tracking_uri, client, evaluated):
    """The evaluated model logged under a task run and registered as the first champion of `tiny-count`."""
    ev = evaluated["result"].evaluated
    with pipeline_run(tracking_uri, "exp-model", "pipe-model", stage="evaluate") as parent, \
            task_run(parent, "count", stage="evaluate") as run:
        info = log_dynamic_model(run, evaluated["model"], backbone_cfg=evaluated["bcfg"],
                                 model_cfg=evaluated["mcfg"], costs=evaluated["costs"], curve=ev.curve, budget=0.5,
                                 task="count", path_stats=ev.path_stats,
                                 certificate={"target": "budget", "confidence_level": None, "bound": None})
    decision = promote(client, "tiny-count", model_uri_of(run), run_id=run.run_id,
                       val_accuracy=ev.calibration["val_accuracy"], val_macs=ev.calibration["val_macs"],
                       test_accuracy=ev.test["accuracy"], test_macs=ev.test["macs"], budget=0.5)
    return info, decision


def test_registered_model_round_trip(registered, evaluated):
    model, data = evaluated["model"], evaluated["data"]
    info, decision = registered
    assert decision.promoted and decision.created
    assert info.model_uri.startswith("models:/m-")
    loaded = mlflow.pyfunc.load_model(f"models:/tiny-count@{CHAMPION}")
    sig = loaded.metadata.signature
    assert tuple(sig.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 16, 16)
    assert {p.name for p in sig.params.params} == {"budget", "thresholds", "budget_confidence", "max_drop",
                                                    "drop_confidence"}
    predictor = loaded.unwrap_python_model().predictor

    x = pixels(48, seed=5)
    xn = normalised(x, model)

    def same_as_original(out, thresholds):
        ref = model.forward_dynamic(xn, thresholds)
        assert np.array_equal(out["exit_index"], ref.exit_index.numpy())
        assert np.array_equal(out["prediction"], ref.preds.numpy())
        cum = np.array(evaluated["costs"].cumulative())
        assert np.array_equal(out["macs"], cum[ref.exit_index.numpy()])
        return ref

    # a budget picks the thresholds calibrated on val at that budget (0.42: the 0.40 point, never above)
    val_logits = collect_exit_logits(model, data.val[0])
    for budget, calibrated_at in ((0.4, 0.4), (0.42, 0.4), (0.45, 0.45), (0.5, 0.5)):
        expected = calibrate(val_logits=val_logits, val_labels=data.val[1], costs=evaluated["costs"],
                             budget_fraction=calibrated_at).thresholds
        out = loaded.predict(x, params={"budget": budget})
        assert predictor.resolve_thresholds(budget=budget) == pytest.approx(expected)
        same_as_original(out, expected)
    # no params: the thresholds calibrated at the model's budget, saved in the model
    same_as_original(loaded.predict(x), model.thresholds)
    # explicit thresholds, chosen so that every exit is used
    with torch.no_grad():
        conf = torch.stack([torch.softmax(lg, -1).max(-1).values for lg in model(xn)])
    th = [float(conf[s].quantile(0.5)) for s in range(3)] + [0.0]
    out = loaded.predict(x, params={"thresholds": th})
    same_as_original(out, th)
    assert len(set(out["exit_index"].tolist())) >= 3
    assert out["confidence"].dtype == np.float32 and ((out["confidence"] > 0) & (out["confidence"] <= 1)).all()


def test_served_model_certifies_per_request_as_evaluate_does(registered, evaluated):
    """budget_confidence / max_drop per request: the thresholds `calibrate` / `calibrate_drop` choose from the
    same val logits, recomputed from the counts stored in the model; the logged certificate is in the MLmodel."""
    from dynadapter.inference import calibrate_drop

    model, data, costs = evaluated["model"], evaluated["data"], evaluated["costs"]
    loaded = mlflow.pyfunc.load_model(f"models:/tiny-count@{CHAMPION}")
    assert loaded.metadata.metadata["dynadapter_certificate"]["target"] == "budget"
    predictor = loaded.unwrap_python_model().predictor
    val_logits = collect_exit_logits(model, data.val[0])
    x = pixels(32, seed=9)
    for budget, level in ((0.6, 0.9), (0.8, 0.95), (1.0, 0.9)):
        expected = calibrate(val_logits=val_logits, val_labels=data.val[1], costs=costs, budget_fraction=budget,
                             budget_confidence=level)
        assert predictor.resolve_thresholds(budget=budget, budget_confidence=level) == pytest.approx(
            expected.thresholds, abs=0)
        assert predictor.certify(budget=budget, budget_confidence=level)["bound"] == pytest.approx(expected.bound)
        out = loaded.predict(x, params={"budget": budget, "budget_confidence": level})
        ref = model.forward_dynamic(normalised(x, model), expected.thresholds)
        assert np.array_equal(out["exit_index"], ref.exit_index.numpy())
    expected = calibrate_drop(val_logits=val_logits, val_labels=data.val[1], costs=costs, max_drop=0.3,
                              confidence_level=0.8)
    assert predictor.resolve_thresholds(max_drop=0.3, drop_confidence=0.8) == pytest.approx(expected.thresholds, abs=0)
    loaded.predict(x, params={"max_drop": 0.3, "drop_confidence": 0.8})
    with pytest.raises(MlflowException, match="cannot be certified at confidence 0.9"):
        loaded.predict(x, params={"budget": 0.05, "budget_confidence": 0.9})
    with pytest.raises(MlflowException, match="either max_drop"):
        loaded.predict(x, params={"budget": 0.5, "max_drop": 0.01})


@pytest.mark.parametrize("bad,params,match", [
    (pixels(2, 0)[:, :, :8, :8], None, r"\(-1, 3, 16, 16\)"),  # wrong spatial size
    (pixels(2, 0)[:, 0], None, r"\(-1, 3, 16, 16\)"),  # missing channel axis
    (pixels(2, 0).astype(np.float64), None, "float32"),
    ((pixels(2, 0) * 255).astype(np.uint8), None, "uint8"),
    (pixels(2, 0) * 255, None, r"\[0, 1\]"),  # 0-255 floats
    (np.full((1, 3, 16, 16), np.nan, np.float32), None, "NaN"),
    (pixels(2, 0), {"thresholds": [0.5, 0.5]}, "need 4 values"),
    (pixels(2, 0), {"budget": 0.01}, r"below what this model can spend: every image leaving at the first exit costs"),
    (pixels(2, 0), {"budget": -1}, "finite fraction"),
    (pixels(2, 0), {"budget": 0.5, "thresholds": [0.5] * 4}, "either budget or thresholds"),
])
def test_bad_inputs_raise_clear_errors(evaluated, tmp_path, bad, params, match):
    """The predictor raises ValueError naming the contract; MLflow's own schema check (shape, dtype) runs
    first in the pyfunc and names the expected shape the same way."""
    ev = evaluated["result"].evaluated
    bundle = save_bundle(evaluated["model"], tmp_path / "b", backbone_cfg=evaluated["bcfg"],
                         model_cfg=evaluated["mcfg"], costs=evaluated["costs"], curve=ev.curve, budget=0.5)
    predictor = load_bundle(bundle)
    with pytest.raises(ValueError, match=match):
        predictor.predict(bad, **(params or {}))


def test_budget_below_every_calibrated_one_sends_everyone_to_the_first_exit(evaluated, tmp_path):
    """Between the cheapest possible cost and the smallest calibrated budget: thresholds 0 (cost exactly the
    floor on any input, so the budget holds), with a warning naming both; below the floor: refused."""
    ev = evaluated["result"].evaluated
    bundle = save_bundle(evaluated["model"], tmp_path / "b", backbone_cfg=evaluated["bcfg"],
                         model_cfg=evaluated["mcfg"], costs=evaluated["costs"], curve=ev.curve, budget=0.5)
    predictor = load_bundle(bundle)
    predictor.curve = [p for p in predictor.curve if p["budget"] >= 0.6]  # as if nothing cheaper was calibrated
    floor = predictor.cheapest_fraction
    costs = evaluated["costs"]
    assert floor == pytest.approx(costs.cumulative([0.0] * 4)[0] / costs.full_depth_baseline())
    assert 0 < floor < 0.55
    budget = (floor + 0.6) / 2
    with pytest.warns(UserWarning, match="below the smallest val-calibrated budget .0.6"):
        out = predictor.predict(pixels(16, seed=3), budget=budget)
    assert out["exit_index"].tolist() == [0] * 16
    assert (out["macs"] / costs.full_depth_baseline() == pytest.approx(floor)) and floor <= budget
    with pytest.raises(ValueError, match=f"pass a budget >= {floor:.3f}"):
        predictor.predict(pixels(2, 0), budget=floor - 0.01)


def test_pyfunc_bad_params_raise_mlflow_invalid_parameter_value(registered):
    """The scoring server turns an MlflowException into a 400 whose `message` carries its text; any other
    exception becomes "unexpected error". So the pyfunc raises MLflow's own, with the predictor's reason."""
    loaded = mlflow.pyfunc.load_model(f"models:/tiny-count@{CHAMPION}")
    for params, reason in (({"budget": -1.0}, "finite fraction"), ({"budget": 0.01}, "below what this model"),
                           ({"thresholds": [0.5, 0.5]}, "need 4 values")):
        with pytest.raises(MlflowException, match=reason) as err:
            loaded.predict(pixels(2, 0), params=params)
        assert err.value.error_code == "INVALID_PARAMETER_VALUE" and err.value.get_http_status_code() == 400


def test_pyfunc_rejects_bad_shape_and_dtype(registered):
    loaded = mlflow.pyfunc.load_model(f"models:/tiny-count@{CHAMPION}")
    with pytest.raises(MlflowException, match=r"\(-1, 3, 16, 16\)"):
        loaded.predict(pixels(2, 0)[:, :, :8, :8])
    with pytest.raises((MlflowException, ValueError), match="float32"):
        loaded.predict(pixels(2, 0).astype(np.float64))
    with pytest.raises(MlflowException, match=r"\[0, 1\]") as err:  # the predictor's reason, as MLflow's own
        loaded.predict(pixels(2, 0) * 255)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"


# ------------------------------------------------------------------------------------------ promotion

PROMOTION_CASES = [  # (champion before: (val accuracy, val MACs) or None, candidate, promoted?)
    (None, (0.50, 100.0), True),
    ((0.80, 100.0), (0.85, 150.0), True),  # better accuracy, even if dearer
    ((0.80, 100.0), (0.75, 50.0), False),  # worse accuracy, even if cheaper
    ((0.80, 100.0), (0.80, 90.0), True),  # tie, fewer MACs
    ((0.80, 100.0), (0.80, 100.0), False),  # full tie: the incumbent stays
    ((0.80, 100.0), (0.80, 110.0), False),
]
OLD, NEW = 1.0, 2.0  # what the incumbent's and the candidate's logged models answer


@pytest.fixture(scope="module")
def exp_id(client, tmp_path_factory):
    # artifacts under the test's temp dir: MLflow's default artifact root is ./mlruns in the cwd (the checkout)
    return client.create_experiment("exp-promote", artifact_location=tmp_path_factory.mktemp("promote").as_uri())


@pytest.mark.parametrize("i,before,candidate,promoted", [(i, *c) for i, c in enumerate(PROMOTION_CASES)])
def test_promotion(client, exp_id, i, before, candidate, promoted):
    name = f"promo-{i}"
    if before is not None:
        run_id, uri = logged_model(client, exp_id, OLD)
        assert promote(client, name, uri, run_id=run_id, val_accuracy=before[0], val_macs=before[1]).promoted
    old = client.get_model_version_by_alias(name, CHAMPION).version if before else None
    run_id, uri = logged_model(client, exp_id, NEW)

    first = promote(client, name, uri, run_id=run_id, val_accuracy=candidate[0], val_macs=candidate[1],
                    budget=0.5)
    assert first.created and first.promoted is promoted
    champion = str(client.get_model_version_by_alias(name, CHAMPION).version)
    assert champion == (first.version if promoted else str(old)) == first.champion
    version = client.get_model_version(name, first.version)
    assert version.tags[V_DECISION] == ("promoted" if promoted else "kept")
    assert float(version.tags["dynadapter.val_accuracy"]) == candidate[0]
    assert float(version.tags["dynadapter.val_macs"]) == candidate[1]
    if before:
        assert float(version.tags["dynadapter.previous_champion_val_accuracy"]) == before[0]
    assert first.reason in version.description
    # the alias serves the logged model of the version it names: the candidate's if promoted, else the old one's
    assert predicted(f"models:/{name}@{CHAMPION}") == (NEW if promoted else OLD)

    # the same run again: no new version, nothing changes
    count = len(client.search_model_versions(f"name = '{name}'"))
    again = promote(client, name, uri, run_id=run_id, val_accuracy=candidate[0], val_macs=candidate[1],
                    budget=0.5)
    assert not again.created and (again.version, again.promoted) == (first.version, first.promoted)
    assert len(client.search_model_versions(f"name = '{name}'")) == count
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == champion == again.champion
    assert client.get_model_version(name, first.version).tags == version.tags


@pytest.mark.parametrize("stopped_after", ["register", "alias"])
def test_interrupted_promotion_is_completed_by_a_rerun(client, exp_id, stopped_after):
    name = f"promo-interrupted-{stopped_after}"
    run_id, uri = logged_model(client, exp_id, 0.5)
    promote(client, name, uri, run_id=run_id, val_accuracy=0.5, val_macs=100.0)
    run_id, uri = logged_model(client, exp_id, 0.9)
    # what an interrupted call leaves: the version with its figures, maybe the alias, no decision
    client.create_model_version(name, uri, run_id=run_id, tags={
        TAG_MODEL_URI: uri, "dynadapter.val_accuracy": "0.9", "dynadapter.val_macs": "100.0"})
    pending = str(max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)).version)
    if stopped_after == "alias":
        client.set_model_version_tag(name, pending, "dynadapter.reason", "val accuracy 0.9 > 0.5 of v1")
        client.set_registered_model_alias(name, CHAMPION, pending)

    done = promote(client, name, uri, run_id=run_id, val_accuracy=0.9, val_macs=100.0)
    assert not done.created and done.version == pending and done.promoted
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == pending == done.champion
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    tags = client.get_model_version(name, pending).tags
    assert tags[V_DECISION] == "promoted" and "0.5" in tags["dynadapter.reason"]
    assert predicted(f"models:/{name}@{CHAMPION}") == 0.9


@pytest.mark.parametrize("candidate_val,candidate_test,promoted", [
    (0.70, 0.95, False),  # better on test, worse on val: test must not buy the alias
    (0.90, 0.40, True),  # better on val, worse on test: promoted, its test figure recorded beside
])
def test_promotion_is_decided_on_val_never_on_test(client, exp_id, candidate_val, candidate_test, promoted):
    name = f"promo-val-{candidate_val}"
    run_id, uri = logged_model(client, exp_id, 0.5)
    promote(client, name, uri, run_id=run_id, val_accuracy=0.80, val_macs=100.0, test_accuracy=0.60,
            test_macs=100.0, budget=0.5)
    run_id, uri = logged_model(client, exp_id, 0.5)
    decision = promote(client, name, uri, run_id=run_id, val_accuracy=candidate_val, val_macs=100.0,
                       test_accuracy=candidate_test, test_macs=90.0, budget=0.5)
    assert decision.promoted is promoted and "val accuracy" in decision.reason and "test" not in decision.reason
    tags = client.get_model_version(name, decision.version).tags
    assert float(tags["dynadapter.val_accuracy"]) == candidate_val
    assert float(tags["dynadapter.test_accuracy"]) == candidate_test  # recorded, not compared
    assert float(tags["dynadapter.previous_champion_test_accuracy"]) == 0.60
    assert "recorded, not compared" in client.get_model_version(name, decision.version).description


def test_a_champion_chosen_on_test_by_an_earlier_release_is_replaced(client, exp_id):
    name = "promo-legacy"
    run_id, uri = logged_model(client, exp_id, 0.5)
    client.create_registered_model(name)
    old = client.create_model_version(name, uri, run_id=run_id, tags={
        TAG_MODEL_URI: uri, "dynadapter.test_accuracy": "0.99", "dynadapter.macs": "10.0",
        "dynadapter.decision": "promoted"})
    client.set_registered_model_alias(name, CHAMPION, old.version)
    run_id, uri = logged_model(client, exp_id, 0.5)
    decision = promote(client, name, uri, run_id=run_id, val_accuracy=0.5, val_macs=100.0, test_accuracy=0.4)
    assert decision.promoted and decision.previous_champion == str(old.version)
    assert "chosen on test accuracy" in decision.reason


CARD = {"task": "count", "backbone": "vit_tiny_patch16_224", "petl": "adapter", "exits": [3, 6, 9, 12],
        "budget": 0.5, "val_accuracy": 0.8125, "test_accuracy": 0.775, "val_fraction": 0.48, "test_fraction": 0.49,
        "full_depth_mmacs": 3.2,
        "certified": {"target": "budget", "budget_fraction": 0.5, "confidence_level": 0.9, "bound": 0.4987,
                      "max_drop": None},
        "curve": [{"budget": 0.3, "val_accuracy": 0.7, "test_accuracy": 0.66, "test_fraction": 0.29},
                  {"budget": 1.0, "val_accuracy": 0.9, "test_accuracy": 0.85, "test_fraction": 1.0}]}


def test_val_accuracy_ranks_versions_under_the_same_promise_only(client, exp_id):
    """A certified budget spends less and scores lower on val than the val-mean calibration at the same budget:
    switching evaluate.budget_confidence must not leave the old champion in place forever. Under one promise the
    usual rule holds; a holder registered before promises were recorded counts as the val mean at its budget."""
    name = "promise-switch"
    mean, certified = promise_of(None, 0.5), promise_of({"target": "budget", "budget_fraction": 0.5,
                                                         "confidence_level": 0.9})
    assert (mean, certified) == ("budget 0.5, val mean", "budget 0.5, confidence 0.9")
    run_id, uri = logged_model(client, exp_id, OLD)
    assert promote(client, name, uri, run_id=run_id, val_accuracy=0.86, val_macs=100.0, budget=0.5).promoted
    run_id, uri = logged_model(client, exp_id, NEW)  # the old rule's own promise (no tag on v1): compared
    kept = promote(client, name, uri, run_id=run_id, val_accuracy=0.85, val_macs=90.0, budget=0.5, promise=mean)
    assert not kept.promoted and "val accuracy 0.8500 < 0.8600" in kept.reason
    run_id, uri = logged_model(client, exp_id, NEW)  # certified: lower val accuracy, but another promise
    switch = promote(client, name, uri, run_id=run_id, val_accuracy=0.84, val_macs=88.0, budget=0.5,
                     promise=certified)
    assert switch.promoted and '"budget 0.5, val mean", this version "budget 0.5, confidence 0.9"' in switch.reason
    assert client.get_model_version(name, switch.version).tags["dynadapter.promise"] == certified
    run_id, uri = logged_model(client, exp_id, OLD)  # the same promise again: the usual comparison
    worse = promote(client, name, uri, run_id=run_id, val_accuracy=0.83, val_macs=80.0, budget=0.5,
                    promise=certified)
    assert not worse.promoted and worse.champion == switch.version


def test_model_card_states_the_accuracy_drop_certificate():
    card = {**CARD, "certified": {"target": "accuracy_drop", "max_drop": 0.02, "confidence_level": 0.9,
                                  "bound": 0.0183}}
    assert "at most 0.02, certified at confidence 0.9 (bound 0.0183)" in model_card(card)
    assert "nothing certified" in model_card({**CARD, "certified": {"target": "budget", "confidence_level": None}})


def test_registered_version_and_model_carry_the_model_card(client, exp_id):
    name = "dynadapter-card"
    run_id, uri = logged_model(client, exp_id, 0.5)
    decision = promote(client, name, uri, run_id=run_id, val_accuracy=0.8125, val_macs=10.0, test_accuracy=0.775,
                       test_macs=10.0, budget=0.5, card=CARD)
    text = client.get_model_version(name, decision.version).description
    for expected in ("`count`", "vit_tiny_patch16_224", "`adapter`", "3, 6, 9, 12", "81.2%", "77.5%", "0.490",
                     "| 0.3 | 70.0% | 66.0% | 0.290 |", "| 1 | 90.0% | 85.0% | 1.000 |", decision.reason,
                     "at most 0.499 of full depth (within the budget) with probability 0.9"):
        assert expected in text, expected
    assert "vit_tiny_patch16_224" in client.get_registered_model(name).description  # the registry page says it
