"""Real logged MLflow models for the registry tests: tiny pyfunc models that answer a fixed number, so a test can
tell from a loaded `models:/<name>@<alias>` which logged model the alias really points at.

Both helpers use MLflow's global tracking URI (the fluent API logs and loads through it); the test module's
fixture points it at the store the client uses.
"""

from __future__ import annotations


def logged_model(client, experiment_id: str, value: float) -> tuple[str, str]:
    """A new run of `experiment_id` with a logged pyfunc model that predicts `value` for every input row.

    Returns (run id, model URI) as `log_model` reports them: an artifact a registry version can load.
    """
    import mlflow

    class Constant(mlflow.pyfunc.PythonModel):
        def __init__(self, answer: float):
            self.answer = answer

        def predict(self, context, model_input, params=None):
            return [self.answer] * len(model_input)

    assert mlflow.get_tracking_uri() == client.tracking_uri, "point the fluent API at the client's store"
    run = client.create_run(experiment_id)
    with mlflow.start_run(run_id=run.info.run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=Constant(float(value)), pip_requirements=[])
    return run.info.run_id, info.model_uri


def predicted(model_uri: str) -> float:
    """What the model behind `model_uri` (a `models:/...` URI: version or alias) answers."""
    import mlflow
    import pandas as pd

    (answer,) = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"x": [0.0]}))
    return float(answer)
