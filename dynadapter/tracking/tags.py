"""Names of the tags dynadapter writes on MLflow runs and model versions, and MLflow's own limits."""

from __future__ import annotations

TAG_PIPELINE_ID = "dynadapter.pipeline_id"
TAG_KIND = "dynadapter.kind"  # "pipeline" (parent) | "task" (nested)
TAG_STAGE = "dynadapter.stage"
TAG_TASK = "dynadapter.task"
TAG_MODEL_URI = "dynadapter.model_uri"  # on a run: its logged dynamic model; on a version: what it registers
TAG_OWNER_HOST = "dynadapter.owner_host"  # the machine and process that hold a run RUNNING
TAG_OWNER_PID = "dynadapter.owner_pid"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI shows task runs under the parent
PIPELINE_ID_ENV = "DYNADAPTER_PIPELINE_ID"
CHAMPION = "champion"

# version tags written by `promote`; DECISION is written last and marks the decision complete. The decision
# compares val figures at the budget (promotion is a selection: test never decides); test is recorded beside.
V_VAL_ACCURACY = "dynadapter.val_accuracy"
V_VAL_MACS = "dynadapter.val_macs"
V_TEST_ACCURACY = "dynadapter.test_accuracy"
V_TEST_MACS = "dynadapter.test_macs"
V_ACCURACY = V_VAL_ACCURACY  # the figures the decision compares
V_MACS = V_VAL_MACS
V_BUDGET = "dynadapter.budget"
V_PROMISE = "dynadapter.promise"  # what the thresholds promise (registry.promise_of): figures compare under one only
V_DECISION = "dynadapter.decision"  # "promoted" | "kept"
V_REASON = "dynadapter.reason"
V_PREVIOUS = "dynadapter.previous_champion"
V_PREVIOUS_ACCURACY = "dynadapter.previous_champion_val_accuracy"
V_PREVIOUS_MACS = "dynadapter.previous_champion_val_macs"
V_PREVIOUS_TEST_ACCURACY = "dynadapter.previous_champion_test_accuracy"

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH_LIMIT = 1000  # MLflow's limit on metrics per log_batch call
