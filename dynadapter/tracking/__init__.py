"""MLflow helpers: one parent run per pipeline run with nested runs per task, the logged dynamic model, and
registry promotion that moves the `champion` alias only to a model that is at least as good.

Everything goes through an explicit `MlflowClient` for the run's tracking URI (no fluent active run), so the
same helpers work in a DVC stage, a Ray worker and a test, side by side; only the two MLflow calls that read
the global tracking URI (model logging, registering a `models:/` source) get it pointed at the run's store.
Run handles (`RunRef`) are plain picklable data: a Tune trial or Train worker can receive its parent's handle
and open nested runs under it.

Parent runs: each stage process calls `pipeline_run(..., pipeline_id=...)`; the parent run is the run of the
experiment tagged `dynadapter.pipeline_id = <id>` (created by the first stage, resumed by the next ones). The
id comes from `pipeline_id_for`: $DYNADAPTER_PIPELINE_ID when set (a CI / Ray job id), otherwise a hash of the
git commit and the resolved `base` section, so the stages of one `dvc repro` on one commit share a parent.

One module per concern: `tags` (tag names), `connection` (URIs, the fail-fast check, `RunRef`), `runs` (parent
and task run lifecycle), `log` (params, metrics, artifacts), `model` (the pyfunc), `registry` (promotion).
Everything is re-exported here: `from dynadapter.tracking import X` is the public way in.
"""

from __future__ import annotations

from dynadapter.tracking.connection import (RunRef, TrackingUnavailableError, check_tracking_server,
                                            resolve_tracking_uri)
from dynadapter.tracking.log import (flatten_numbers, flatten_params, log_budget_curve, log_config,
                                     log_exit_accuracies, log_figure, log_history, log_macs, log_metrics, log_params,
                                     log_table, log_task_result, pareto_figure)
from dynadapter.tracking.model import dynamic_model_signature, log_dynamic_model
from dynadapter.tracking.registry import Promotion, model_card, model_name_for, promise_of, promote
from dynadapter.tracking.runs import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, close_orphaned_runs, find_task_runs, get_or_create_experiment,
                                      get_or_create_parent, model_uri_of, pipeline_id_for, pipeline_run, task_run)
from dynadapter.tracking.tags import (BATCH_LIMIT, CHAMPION, MAX_PARAM_LENGTH, PARENT_TAG, PIPELINE_ID_ENV,
                                      TAG_KIND, TAG_MODEL_URI, TAG_OWNER_HOST, TAG_OWNER_PID, TAG_PIPELINE_ID,
                                      TAG_STAGE, TAG_TASK, V_ACCURACY, V_BUDGET, V_DECISION, V_MACS, V_PREVIOUS,
                                      V_PREVIOUS_ACCURACY, V_PREVIOUS_MACS, V_PREVIOUS_TEST_ACCURACY, V_REASON,
                                      V_TEST_ACCURACY, V_TEST_MACS, V_VAL_ACCURACY, V_VAL_MACS)

__all__ = [
    "BATCH_LIMIT", "CHAMPION", "MAX_PARAM_LENGTH", "PARENT_TAG", "PIPELINE_ID_ENV", "TAG_KIND", "TAG_MODEL_URI",
    "TAG_OWNER_HOST", "TAG_OWNER_PID", "TAG_PIPELINE_ID", "TAG_STAGE", "TAG_TASK", "V_ACCURACY", "V_BUDGET",
    "V_DECISION", "V_MACS", "V_PREVIOUS", "V_PREVIOUS_ACCURACY", "V_PREVIOUS_MACS", "V_PREVIOUS_TEST_ACCURACY",
    "V_REASON", "V_TEST_ACCURACY", "V_TEST_MACS", "V_VAL_ACCURACY", "V_VAL_MACS",
    "Promotion", "RunRef", "TrackingUnavailableError",
    "check_tracking_server", "close_orphaned_runs", "dynamic_model_signature", "find_task_runs", "flatten_numbers",
    "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "flatten_params", "get_or_create_experiment", "get_or_create_parent", "log_budget_curve", "log_config", "log_dynamic_model",
    "log_exit_accuracies", "log_figure", "log_history", "log_macs", "log_metrics", "log_params", "log_table",
    "log_task_result", "model_card", "model_name_for", "model_uri_of", "promise_of", "pareto_figure", "pipeline_id_for", "pipeline_run",
    "promote", "resolve_tracking_uri", "task_run",
]
