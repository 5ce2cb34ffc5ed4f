"""MLflow: one run per training, a registered model per global model and per partition, a ``champion`` alias.

Global models are registered as ``poe-global-<h>d``, partitions as ``poe-<currency slug>-<h>d``; a partition's
version is tagged with the global version it was built on.

Tracking uses ``sqlite:///<lake>/mlflow/mlflow.db`` (the file store is deprecated in MLflow 3) with artifacts
under ``<lake>/mlflow/artifacts``; ``MLFLOW_TRACKING_URI`` points it at a server instead. Only the parent
process writes here, one run after another, so SQLite never sees two writers.

Promotion is conservative: a new version becomes ``champion`` only if its validation error is no worse than
the champion's on the same folds (same fold signature), or, when the folds differ because data was added, if
its skill against persistence is no worse. A version whose metrics are not finite, or absurd (a poisoned price
upstream), is never promoted. The alias moves only after the new version's artifacts are stored and load back,
so a crash never leaves the champion pointing at a broken model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from poe_pipeline.lake import Lake
from poe_pipeline.names import slug

EXPERIMENT = "poe-pipeline"
CHAMPION = "champion"
MAX_SANE_MAE = 5.0  # a log-return MAE above this (a factor of e^5 = 148 off on average) is a poisoned input

logging.getLogger("mlflow").setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def registered_model_name(currency: str, horizon: int) -> str:
    return f"poe-{slug(currency)}-{horizon}d"


def global_model_name(horizon: int) -> str:
    return f"poe-global-{horizon}d"


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

    def log_global(self, result, tags: dict[str, str], parent_run_id: str | None = None) -> Registration:
        """Log one global model's training run, register it, and promote it if it earned it."""
        params = {f"{kind}.{k}": v for kind, p in result.params.items() for k, v in p.items()}
        params |= {f"rounds.{k}": v for k, v in result.rounds.items()}
        params |= {f"weight.{k}": round(v, 6) for k, v in result.weights.items()}
        metrics = {f"{stage}.{group}.{k}": v for stage, groups in result.metrics.items()
                   for group, values in groups.items() for k, v in values.items()}
        files = {"feature_importance.json": json.dumps(result.feature_importance, indent=1),
                 "features.txt": "\n".join(result.feature_names) + "\n"}
        return self._log(global_model_name(result.horizon), f"global-{result.horizon}d", result, params, metrics,
                         files, {**tags, "kind": "global", "horizon": f"{result.horizon}d"}, parent_run_id,
                         description=f"All currencies pooled, {result.horizon}-day log-return")

    def log_currency(self, result, tags: dict[str, str], parent_run_id: str | None = None) -> Registration:
        """Log one partition's training run, register it, and promote it if it earned it."""
        params = {"scale": result.scale, "own_scale": result.own_scale, "pooled_scale": result.pooled_scale,
                  "own_rows": result.own_rows, "global_model": f"{result.global_name} v{result.global_version}"}
        metrics = {f"{group}.{k}": v for group, values in result.metrics.items() for k, v in values.items()}
        return self._log(registered_model_name(result.currency, result.horizon),
                         f"{slug(result.currency)}-{result.horizon}d", result, params, metrics, {},
                         {**tags, "kind": "currency", "currency": result.currency, "horizon": f"{result.horizon}d",
                          "global_model_version": result.global_version},
                         parent_run_id, description=f"{result.currency}, {result.horizon}-day log-return")

    def _log(self, name: str, run_name: str, result, params: dict, metrics: dict, files: dict[str, str],
             tags: dict[str, str], parent_run_id: str | None, description: str) -> Registration:
        from mlflow.entities import Metric, Param, RunTag

        run_tags = {**tags, "mlflow.runName": run_name}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, tags=run_tags)
        run_id = run.info.run_id
        try:
            params = {**params, "folds": result.fold_signature or "none"}
            params |= {f"data.{k}": v for k, v in result.data_window.items() if k != "leagues"}
            params["data.leagues"] = ",".join(result.data_window.get("leagues", []))
            now = _now_ms()
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))]
                + [Metric("train_seconds", result.seconds, now, 0)],
                params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                tags=[RunTag("dataset_hash", str(result.data_window.get("data_hash", "")))],
            )
            if files:
                with tempfile.TemporaryDirectory() as tmp:
                    for file, text in files.items():
                        (Path(tmp) / file).write_text(text)
                    self.client.log_artifacts(run_id, tmp, "info")
            self.client.log_artifacts(run_id, result.artifact_dir, "model")
            registration = self._register(result, name, run_id, description)
            self.client.set_tag(run_id, "promoted", str(registration.promoted).lower())
            self.client.set_tag(run_id, "promotion_reason", registration.reason)
            self.end_run(run_id)
            return registration
        except BaseException:
            self.end_run(run_id, failed=True)
            raise

    def _register(self, result, name: str, run_id: str, description: str) -> Registration:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description=description)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        version = self.client.create_model_version(
            name, source=source, run_id=run_id,
            tags={"fold_signature": result.fold_signature, "validation_mae": repr(result.validation_mae),
                  "validation_skill": repr(result.skill)},
        )
        promoted, reason = self._promotion(name, result.fold_signature, result.validation_mae, result.skill)
        if promoted:
            check_loads(local_path(source))  # loads, or raises before the alias moves
            self.client.set_registered_model_alias(name, CHAMPION, version.version)
        return Registration(run_id, name, str(version.version), promoted, reason)

    def _promotion(self, name: str, folds: str, mae: float, skill: float) -> tuple[bool, str]:
        validated = not (math.isnan(mae) and math.isnan(skill))
        if validated and not (math.isfinite(mae) and 0 <= mae <= MAX_SANE_MAE and math.isfinite(skill)):
            return False, f"validation MAE {mae!r} and skill {skill!r} are not sane numbers: never promoted"
        current = self.champion_version(name)
        if current is None:
            return True, "first version" if validated else "first version (no validation rows)"
        if not validated:
            return False, f"no validation rows; champion v{current.version} stays"
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

    def champion(self, name: str) -> tuple[str, Path] | None:
        """(version, local artifact folder) of a registered model's champion, or None when there is none."""
        version = self.champion_version(name)
        if version is None:
            return None
        return str(version.version), self._local(name, version)

    def version_dir(self, name: str, version: str) -> Path:
        """The local artifact folder of one registered version."""
        return self._local(name, self.client.get_model_version(name, str(version)))

    def _local(self, name: str, version) -> Path:
        if urlparse(version.source).scheme in ("file", ""):
            return local_path(version.source)
        import mlflow

        cache = self.lake.root / "mlflow" / "cache" / name / str(version.version)
        if not (cache / "model").is_dir():  # a remote store: fetch once per version
            mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(cache), tracking_uri=self.uri)
        return cache / "model"


def check_loads(directory: Path) -> None:
    """Load a saved model folder (global ensemble or partition), raising if it is broken."""
    from poe_pipeline.currency_model import META_FILE as CURRENCY_META
    from poe_pipeline.currency_model import read_currency_meta
    from poe_pipeline.modeling import Ensemble

    if (Path(directory) / CURRENCY_META).exists():
        meta = read_currency_meta(directory)
        if not math.isfinite(float(meta["scale"])):
            raise ValueError(f"{directory}: scale {meta['scale']!r} is not finite")
        return
    Ensemble(directory)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
