"""MLflow models-from-code entry point of the registered model: MLflow runs this file when it loads the model,
so the logged model holds code + safetensors + JSON, and no pickle. Not meant to be imported otherwise."""

from mlflow.models import set_model

from dynadapter.serving import DynAdapterPyfunc

set_model(DynAdapterPyfunc())
