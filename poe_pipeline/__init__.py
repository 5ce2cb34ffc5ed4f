"""poe-pipeline: Path of Exile currency forecasts as Dagster assets.

The domain modules in this package are plain Python and never import dagster;
only ``assets/``, ``resources/``, ``definitions.py`` and ``cli.py`` do.
"""

import os

__version__ = "0.1.0"

# MLflow sets its loggers' level from this when it is first imported, wherever that happens (a level set on its
# logger before is overwritten): INFO would print lines per logged model
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
