"""MLflow: one run per (currency, horizon) training, a registered model per partition, a ``champion`` alias.

Tracking uses ``sqlite:///<lake>/mlflow/mlflow.db`` (the file store is deprecated in MLflow 3) with artifacts
under ``<lake>/mlflow/artifacts``; ``MLFLOW_TRACKING_URI`` points it at a server instead. Only the parent
process writes here, one run after another, so SQLite never sees two writers.

Promotion is conservative: a new version becomes ``champion`` only if its validation error is no worse than
the champion's on the same folds (same fold signature), or, when the folds differ because data was added, if
its skill against persistence is no worse. The alias moves only after the new version's artifacts are stored
and load back, so a crash never leaves the champion pointing at a broken model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from poe_pipeline.lake import Lake
from poe_pipeline.names import slug

EXPERIMENT = "poe-pipeline"
CHAMPION = "champion"

logging.getLogger("mlflow").setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def registered_model_name(currency: str, horizon: int) -> str:
    return f"poe-{slug(currency)}-{horizon}d"


def tracking_uri(lake: Lake) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(lake.root / 'mlflow' / 'mlflow.db').as_posix()}"


def local_path(uri: str) -> Path:
    """A ``file://`` artifact URI as a path (artifacts of a local store are read in place, never copied)."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("file", "") else Path(uri)


@dataclass
class Registration:
    run_id: str
    model_name: str
    version: str
    promoted: bool
    reason: str


class ModelTracker:
    """The parent process's handle on MLflow tracking and the model registry."""

    def __init__(self, lake: Lake):
        from mlflow import MlflowClient

        self.lake = lake
        self.uri = tracking_uri(lake)
        if self.uri.startswith("sqlite:///"):
            (lake.root / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
        # An explicit client, never mlflow.set_tracking_uri: that sets MLFLOW_TRACKING_URI for the whole process.
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            local = self.uri.startswith("sqlite")
            artifacts = (lake.root / "mlflow" / "artifacts").resolve().as_uri() if local else None
            self.experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        else:
            self.experiment_id = experiment.experiment_id

    # -- runs ------------------------------------------------------------------------------------------------------

    def start_parent_run(self, name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def end_run(self, run_id: str, failed: bool = False) -> None:
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def log_training(self, result, tags: dict[str, str], parent_run_id: str | None = None) -> Registration:
        """Log one partition's training run, register its ensemble, and promote it if it earned it."""
        from mlflow.entities import Metric, Param, RunTag

        name = registered_model_name(result.currency, result.horizon)
        run_tags = {**tags, "currency": result.currency, "horizon": f"{result.horizon}d",
                    "mlflow.runName": f"{slug(result.currency)}-{result.horizon}d"}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, tags=run_tags)
        run_id = run.info.run_id
        try:
            params = {f"{kind}.{k}": v for kind, p in result.params.items() for k, v in p.items()}
            params |= {f"weight.{k}": round(v, 6) for k, v in result.weights.items()}
            params |= {"shrink": result.shrink, "folds": result.fold_signature or "none"}
            params |= {f"data.{k}": v for k, v in result.data_window.items() if k != "leagues"}
            params["data.leagues"] = ",".join(result.data_window.get("leagues", []))
            metrics = [
                Metric(f"{group}.{k}", float(v), 0, 0)
                for group, values in result.metrics.items() for k, v in values.items() if v == v  # drop NaN
            ]
            metrics.append(Metric("train_seconds", result.seconds, 0, 0))
            self.client.log_batch(
                run_id,
                metrics=[Metric(m.key, m.value, _now_ms(), 0) for m in metrics],
                params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                tags=[RunTag("dataset_hash", result.data_window.get("data_hash", ""))],
            )
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "feature_importance.json").write_text(json.dumps(result.feature_importance, indent=1))
                (Path(tmp) / "features.txt").write_text("\n".join(result.feature_names) + "\n")
                self.client.log_artifacts(run_id, tmp, "info")
            self.client.log_artifacts(run_id, result.artifact_dir, "ensemble")
            registration = self._register(result, name, run_id)
            self.client.set_tag(run_id, "promoted", str(registration.promoted).lower())
            self.client.set_tag(run_id, "promotion_reason", registration.reason)
            self.end_run(run_id)
            return registration
        except BaseException:
            self.end_run(run_id, failed=True)
            raise

    def _register(self, result, name: str, run_id: str) -> Registration:
        from mlflow.exceptions import MlflowException

        from poe_pipeline.modeling import Ensemble

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description=f"{result.currency}, {result.horizon}-day log-return")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/ensemble"
        skill = result.metrics.get("ensemble", {}).get("skill", float("nan"))
        version = self.client.create_model_version(
            name, source=source, run_id=run_id,
            tags={"fold_signature": result.fold_signature, "validation_mae": repr(result.validation_mae),
                  "validation_skill": repr(skill)},
        )
        promoted, reason = self._promotion(name, result.fold_signature, result.validation_mae, skill)
        if promoted:
            Ensemble(local_path(source))  # loads, or raises before the alias moves
            self.client.set_registered_model_alias(name, CHAMPION, version.version)
        return Registration(run_id, name, str(version.version), promoted, reason)

    def _promotion(self, name: str, folds: str, mae: float, skill: float) -> tuple[bool, str]:
        current = self.champion_version(name)
        if current is None:
            return True, "first version"
        old_mae = float(current.tags.get("validation_mae", "nan"))
        old_skill = float(current.tags.get("validation_skill", "nan"))
        if current.tags.get("fold_signature") == folds:
            if not mae <= old_mae:
                return False, f"validation MAE {mae:.5f} is worse than champion v{current.version}'s {old_mae:.5f}"
            return True, f"validation MAE {mae:.5f} <= champion v{current.version}'s {old_mae:.5f} on the same folds"
        if old_skill == old_skill and not skill >= old_skill:
            return False, (f"folds changed; skill {skill:.4f} is worse than champion v{current.version}'s "
                           f"{old_skill:.4f}")
        return True, f"folds changed; skill {skill:.4f} >= champion v{current.version}'s {old_skill:.4f}"

    # -- the registry ----------------------------------------------------------------------------------------------

    def champion_version(self, name: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            return None

    def champion_dir(self, currency: str, horizon: int) -> tuple[str, Path] | None:
        """(version, local artifact folder) of the champion, or None when there is none."""
        name = registered_model_name(currency, horizon)
        version = self.champion_version(name)
        if version is None:
            return None
        if urlparse(version.source).scheme in ("file", ""):
            return str(version.version), local_path(version.source)
        import mlflow

        cache = self.lake.root / "mlflow" / "cache" / name / str(version.version)
        if not (cache / "ensemble" / "ensemble.json").exists():  # a remote store: fetch once per version
            mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(cache), tracking_uri=self.uri)
        return str(version.version), cache / "ensemble"


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
