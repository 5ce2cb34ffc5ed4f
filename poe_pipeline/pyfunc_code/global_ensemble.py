"""MLflow's models-from-code entry of a global model: MLflow copies this file into the model and runs it at load,
instead of unpickling a Python object (``mlflow_models.save_pyfunc``)."""

from mlflow.models import set_model

from poe_pipeline.mlflow_models import GlobalPyfunc

set_model(GlobalPyfunc())
