"""The files MLflow stores in each model and runs to build its pyfunc at load (models from code)."""
