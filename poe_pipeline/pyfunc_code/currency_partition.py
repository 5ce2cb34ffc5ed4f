"""MLflow's models-from-code entry of a partition: MLflow copies this file into the model and runs it at load,
instead of unpickling a Python object (``mlflow_models.save_pyfunc``)."""

from mlflow.models import set_model

from poe_pipeline.mlflow_models import CurrencyPyfunc

set_model(CurrencyPyfunc())
