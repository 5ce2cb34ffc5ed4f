"""poe-pipeline: Path of Exile currency forecasts as Dagster assets.

The domain modules in this package are plain Python and never import dagster;
only ``assets/``, ``resources/``, ``definitions.py`` and ``cli.py`` do.
"""

__version__ = "0.1.0"
