"""DVC stage `register`: register each task's evaluated Dyn-Adapter model and promote it only if it is better."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from dynadapter.config import Params
from pipelines.common import (load_stage_params, save_stage_config, stage_parser, stage_tracking,
                              write_text_atomic)

DESCRIPTION = """Register the models the evaluate stage logged, one registered model per task
(<register.model_prefix>-<task>), and move the alias register.alias (default `champion`) to the new version
only if its VALIDATION accuracy at base.budget beats the current champion's (a tie goes to fewer val MACs per
image), or if there is no champion yet, or if the champion's thresholds promise something else (another budget,
evaluate.budget_confidence or target: val accuracy only ranks versions under the same promise). Promotion is a selection, so test never decides: test accuracy is
recorded beside. The decision, its reason and both models' figures are recorded as tags; the description of
the new version is the decision plus a model card (task, backbone, PETL method, val and test accuracy and MACs
fraction at the budget, the budget curve), which a promotion also puts on the registered model. Running the stage again changes nothing: a version already
decided is left as it is; one whose registration was interrupted gets its decision finished.
Load the champion with mlflow.pyfunc.load_model("models:/<name>@champion") after
mlflow.set_tracking_uri(<base.mlflow.tracking_uri>).
Reads <paths.outputs>/evaluate/models.json. Outputs: <paths.outputs>/register/decisions.json."""


def run(params: Params, parent) -> dict:
    from dynadapter.tracking import model_name_for, promise_of, promote

    base, cfg = params.base, params.register
    models = json.loads((Path(base.paths.outputs) / "evaluate" / "models.json").read_text())
    missing = [t for t in base.tasks if t not in models]
    if missing:
        raise SystemExit(f"error: {base.paths.outputs}/evaluate/models.json has no model for {missing}: "
                         "rerun the evaluate stage")
    stale = [t for t in base.tasks if models[t].get("budget") != base.budget or "val_accuracy" not in models[t]]
    if stale:
        raise SystemExit(f"error: {base.paths.outputs}/evaluate/models.json of {stale} was not evaluated at "
                         f"base.budget {base.budget} with val figures: rerun the evaluate stage")
    decisions = {}
    for task in base.tasks:
        m = models[task]
        name = model_name_for(task, cfg.model_prefix)
        decision = promote(parent.client, name, m["model_uri"], run_id=m["run_id"], val_accuracy=m["val_accuracy"],
                           val_macs=m["val_macs"], test_accuracy=m["test_accuracy"], test_macs=m["test_macs"],
                           budget=m["budget"], alias=cfg.alias, card=m.get("card"),
                           promise=promise_of((m.get("card") or {}).get("certified"), m["budget"]))
        decisions[task] = {**asdict(decision), **{k: m[k] for k in ("val_accuracy", "val_macs", "test_accuracy",
                                                                    "test_macs")}}
        verdict = f"promoted to @{cfg.alias}" if decision.promoted else f"not promoted (@{cfg.alias} stays v{decision.champion})"
        print(f"register {name} v{decision.version}: {verdict}: {decision.reason}")
    return decisions


def main(argv: list[str] | None = None) -> int:
    args = stage_parser("register", DESCRIPTION).parse_args(argv)
    params = load_stage_params(args)
    out = Path(params.base.paths.outputs) / "register"
    with stage_tracking(params, "register") as parent:
        decisions = run(params, parent)
    out.mkdir(parents=True, exist_ok=True)
    save_stage_config(params, "register", out)
    write_text_atomic(out / "decisions.json", json.dumps(decisions, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
