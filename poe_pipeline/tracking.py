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

import contextlib
import functools
import json
import logging
import math
import os
import sqlite3
import stat
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import polars as pl

from poe_pipeline.lake import Lake
from poe_pipeline.names import slug

EXPERIMENT = "poe-pipeline"
CHAMPION = "champion"
MAX_SANE_MAE = 5.0  # a log-return MAE above this (a factor of e^5 = 148 off on average) is a poisoned input

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def registered_model_name(currency: str, horizon: int) -> str:
    return f"poe-{slug(currency)}-{horizon}d"


def global_model_name(horizon: int) -> str:
    return f"poe-global-{horizon}d"


def tracking_uri(lake: Lake) -> str:
    from poe_pipeline.settings import Settings

    return Settings.from_env().tracking_uri or f"sqlite:///{lake.mlflow_db.as_posix()}"


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
    experiment_id: str = ""


@dataclass(frozen=True)
class RegisteredVersion:
    """What the registry records of one model version: enough to find its files and verify them."""

    name: str
    version: str
    source: str
    tags: dict[str, str] = field(default_factory=dict)  # read straight from SQLite: the checksums tag alone


class ModelTracker:
    """The parent process's handle on MLflow tracking and the model registry.

    The MLflow client is created on first use: a process that only forecasts from a local (SQLite) registry reads
    the champions with one SQL query and never imports MLflow (about a second of a cold start)."""

    def __init__(self, lake: Lake):
        self.lake = lake
        self.uri = tracking_uri(lake)
        self.local = self.uri.startswith("sqlite")
        self._workspace: str | None = None  # the registry's workspace column, once looked up
        if self.local:
            lake.mlflow_artifacts.mkdir(parents=True, exist_ok=True)

    @functools.cached_property
    def client(self):
        from mlflow import MlflowClient

        # An explicit client, never mlflow.set_tracking_uri: that sets MLFLOW_TRACKING_URI for the whole process.
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    @functools.cached_property
    def experiment_id(self) -> str:
        return self._experiment()

    def _experiment(self) -> str:
        """The experiment, created on first use and tagged as model development (MLflow 3 opens it in the model
        view, not the GenAI one). A lake that moved keeps its old runs readable (``_local`` re-roots their paths)
        and records new ones in a fresh experiment whose artifacts are under the lake's new place."""
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        here = self.lake.mlflow_artifacts.resolve().as_uri() if self.local else None
        if experiment is not None and self.local and experiment.artifact_location != here:
            self.client.rename_experiment(experiment.experiment_id,
                                          f"{EXPERIMENT}-moved-from-{experiment.experiment_id}")
            experiment = None
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(EXPERIMENT, artifact_location=here))
        self.client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
        return experiment_id

    # -- runs ------------------------------------------------------------------------------------------------------

    def start_parent_run(self, name: str, tags: dict[str, str]) -> str:
        """A training session's run. It records the process and host that own it, so that a later session can
        tell a run left RUNNING by a killed process from one still training (``fail_stale_runs``)."""
        self.fail_stale_runs()
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**tags, OWNER_PID_TAG: str(os.getpid()), OWNER_HOST_TAG: _host()})
        return run.info.run_id

    def fail_stale_runs(self) -> list[str]:
        """Mark FAILED the runs still RUNNING whose owning process on this host is gone (killed mid-training);
        returns their ids."""
        import psutil

        stale = []
        for run in self.client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                           max_results=1000):
            pid, host = run.data.tags.get(OWNER_PID_TAG), run.data.tags.get(OWNER_HOST_TAG)
            if pid and host == _host() and not psutil.pid_exists(int(pid)):
                self.client.set_tag(run.info.run_id, "poe.failure", f"its process {pid} died before it ended")
                self.client.set_terminated(run.info.run_id, status="FAILED")
                stale.append(run.info.run_id)
        if stale:
            log.warning("Marked %d MLflow run(s) FAILED: their training process died: %s", len(stale),
                        ", ".join(stale))
        return stale

    def end_run(self, run_id: str, failed: bool = False) -> None:
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def log_global(self, result, tags: dict[str, str], parent_run_id: str | None = None,
                   example: pl.DataFrame | None = None) -> Registration:
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
                         description=f"All currencies pooled, {result.horizon}-day log-return", kind="global",
                         example=example)

    def log_currency(self, result, tags: dict[str, str], parent_run_id: str | None = None,
                     example: pl.DataFrame | None = None) -> Registration:
        """Log one partition's training run, register it, and promote it if it earned it."""
        params = {"scale": result.scale, "own_scale": result.own_scale, "pooled_scale": result.pooled_scale,
                  "own_rows": result.own_rows, "global_model": f"{result.global_name} v{result.global_version}"}
        metrics = {f"{group}.{k}": v for group, values in result.metrics.items() for k, v in values.items()}
        return self._log(registered_model_name(result.currency, result.horizon),
                         f"{slug(result.currency)}-{result.horizon}d", result, params, metrics, {},
                         {**tags, "kind": "currency", "currency": result.currency, "horizon": f"{result.horizon}d",
                          "global_model_version": result.global_version},
                         parent_run_id, description=f"{result.currency}, {result.horizon}-day log-return",
                         kind="currency", example=example)

    def _log(self, name: str, run_name: str, result, params: dict, metrics: dict, files: dict[str, str],
             tags: dict[str, str], parent_run_id: str | None, description: str, kind: str,
             example: pl.DataFrame | None) -> Registration:
        from mlflow.entities import Metric, Param, RunTag

        run_tags = {**tags, "mlflow.runName": run_name, OWNER_PID_TAG: str(os.getpid()), OWNER_HOST_TAG: _host()}
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
            self._log_dataset(run_id, name, result)
            if files:
                with tempfile.TemporaryDirectory() as tmp:
                    for file, text in files.items():
                        (Path(tmp) / file).write_text(text)
                    self.client.log_artifacts(run_id, tmp, "info")
            model_id = self._log_model(run_id, name, kind, result, example)
            registration = self._register(result, name, run_id, model_id, description)
            self.client.set_tag(run_id, "promoted", str(registration.promoted).lower())
            self.client.set_tag(run_id, "promotion_reason", registration.reason)
            self.end_run(run_id)
            return registration
        except BaseException:
            self.end_run(run_id, failed=True)
            raise

    def _log_dataset(self, run_id: str, name: str, result) -> None:
        """The training data as the run's input dataset: the lake's feature store, with the rows' hash as digest."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        window = result.data_window
        with warnings.catch_warnings():  # a file URI matches two registered local sources; either is right
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(self.lake.features.resolve().as_uri())
        dataset = MetaDataset(source,
                              name=f"features {name} ({window.get('first_date', '')}..{window.get('last_date', '')})",
                              digest=str(window.get("data_hash") or "none")[:36])
        self.client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                     tags=[InputTag("mlflow.data.context", "training")])])

    def _log_model(self, run_id: str, name: str, kind: str, result, example: pl.DataFrame | None) -> str:
        """Log the trained folder as an MLflow 3 logged model (a pyfunc with a signature and an input example);
        returns its model id."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        from poe_pipeline.mlflow_models import save_pyfunc

        native = Path(result.artifact_dir)
        logged = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=run_id,
                                                 model_type=f"poe-{kind}")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                example = example if example is not None and example.height else None
                if example is None:
                    raise ValueError(f"{name}: no example rows to describe the model's input")
                logret = _example_forecast(native, kind, example)
                save_pyfunc(Path(tmp) / "pyfunc", native, kind, self._input_features(kind, result, native),
                            example, logret)
                self.client.log_model_artifacts(logged.model_id, str(Path(tmp) / "pyfunc"))
            self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        except BaseException:
            self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        return logged.model_id

    def _input_features(self, kind: str, result, native: Path) -> list[str]:
        """The features a model reads: a partition reads those of the global model version it specialises."""
        if kind == "global":
            return result.feature_names or _feature_names(native)
        return _feature_names(self.version_dir(result.global_name, result.global_version))

    def _register(self, result, name: str, run_id: str, model_id: str, description: str) -> Registration:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description=description)
        location = self.client.get_logged_model(model_id).artifact_location
        native = self._native_dir(location)
        # the logged model's own location, not "models:/<id>": MLflow's SQL registry resolves that URI through the
        # process-wide tracking URI, not this client's (a TODO in MLflow's sqlalchemy_store)
        version = self.client.create_model_version(
            name, source=location, run_id=run_id, model_id=model_id,
            tags={"fold_signature": result.fold_signature, "validation_mae": repr(result.validation_mae),
                  "validation_skill": repr(result.skill), CHECKSUMS_TAG: json.dumps(checksums(native))},
        )
        promoted, reason = self._promotion(name, result.fold_signature, result.validation_mae, result.skill)
        if promoted:
            check_loads(native)  # loads, or raises before the alias moves
            self.client.set_registered_model_alias(name, CHAMPION, version.version)
        return Registration(run_id, name, str(version.version), promoted, reason, self.experiment_id)

    def _promotion(self, name: str, folds: str, mae: float, skill: float) -> tuple[bool, str]:
        validated = not (math.isnan(mae) and math.isnan(skill))
        if validated and not (math.isfinite(mae) and 0 <= mae <= MAX_SANE_MAE and math.isfinite(skill)):
            return False, f"validation MAE {mae!r} and skill {skill!r} are not sane numbers: never promoted"
        current = self.champion_version(name)
        if current is None:
            return True, "first version" if validated else "first version (no validation rows)"
        old_mae = float(current.tags.get("validation_mae", "nan"))
        old_skill = float(current.tags.get("validation_skill", "nan"))
        if math.isnan(old_mae) and math.isnan(old_skill):
            # nothing to compare with: a currency new to the market would otherwise forecast through the global
            # version of its first training all league
            return True, (f"champion v{current.version} had no validation rows" if validated else
                          f"no validation rows, like champion v{current.version}: the newer version replaces it")
        if not validated:
            return False, f"no validation rows; champion v{current.version} stays"
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
        """(version, local folder of its native files) of a registered model's champion, or None."""
        version = self.champion_versions([name]).get(name)
        if version is None:
            return None
        return str(version.version), self.verified(name, version)

    def champion_versions(self, names: Iterable[str]) -> dict[str, RegisteredVersion]:
        """The champion version of each of these registered models that has one, in one registry query (not yet
        verified: ``verified`` checks its files)."""
        names = list(dict.fromkeys(names))
        rows = self._registry_rows(names, alias=CHAMPION)
        if rows is not None:
            return rows
        found = {}
        for name in names:  # a server or an unknown schema: MLflow's client, one lookup a model
            version = self.champion_version(name)
            if version is not None:
                found[name] = RegisteredVersion(name, str(version.version), version.source, dict(version.tags))
        return found

    def version_dir(self, name: str, version: str) -> Path:
        """The local folder of one registered version's native files, verified."""
        rows = self._registry_rows([name], version=str(version))
        if rows is None:
            return self.verified(name, self.client.get_model_version(name, str(version)))
        if name not in rows:
            raise LookupError(f"Model Version (name={name}, version={version}) not found in {self.uri}")
        return self.verified(name, rows[name])

    def _registry_rows(self, names: list[str], alias: str | None = None,
                       version: str | None = None) -> dict[str, RegisteredVersion] | None:
        """Versions straight from a local SQLite registry, read-only: each name's version with ``alias`` (or the
        given ``version``), with its checksums tag. None where MLflow's client must answer instead (a server,
        workspaces, a schema this query does not know)."""
        db = _sqlite_path(self.uri)
        if db is None or os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("1", "true"):
            return None
        if not db.exists():
            return {}  # nothing registered yet (MLflow would create an empty registry)
        found: dict[str, RegisteredVersion] = {}
        try:
            with _read_only(db) as con:
                if self._workspace is None:  # MLflow 3.x keeps every model in a workspace, "default" here
                    self._workspace = "default" if _has_column(con, "model_versions", "workspace") else ""
                workspace = self._workspace or None
                for start in range(0, len(names), 500):  # SQLite caps the parameters of one statement
                    chunk = names[start:start + 500]
                    found |= _query_versions(con, chunk, alias, version, workspace)
        except sqlite3.Error as exc:
            log.debug("registry query fell back to MLflow's client: %s", exc)
            return None
        return found

    def verified(self, name: str, version) -> Path:
        """The version's native files, only from inside the lake's artifact root (or the configured MLflow
        artifact store) and only when every file matches the checksum recorded at registration: a model file is
        code (the forest is a pickle), so nothing else is ever loaded.

        Files verified once in this process are not hashed again while none of them changed (same names, sizes,
        inodes, modification and change times); any write, rename or ``touch`` changes the change time."""
        directory = self._local(name, version)
        recorded = version.tags.get(CHECKSUMS_TAG, "{}") or "{}"
        expected = json.loads(recorded)
        if not expected:
            raise UntrustedModel(f"{name} v{version.version} has no recorded checksums: retrain it")
        key = (str(directory), recorded)
        signature = _files_signature(directory)
        if signature is not None and _VERIFIED.get(key) == signature:
            return directory
        found = checksums(directory)
        if found != expected:
            _VERIFIED.pop(key, None)
            bad = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
            raise UntrustedModel(f"{name} v{version.version}: {', '.join(bad)} at {directory} do not match the "
                                 "checksums recorded at registration (truncated or replaced): retrain it")
        if signature is not None:
            _VERIFIED[key] = signature
        return directory

    def _local(self, name: str, version) -> Path:
        if not self.local:
            import mlflow

            cache = self.lake.mlflow / "cache" / name / str(version.version)
            if not (cache / "artifacts").is_dir():  # a remote store: fetch once per version
                mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(cache),
                                                    tracking_uri=self.uri)
            return self._native_dir(cache.as_uri())
        if version.source.startswith("models:/"):
            return self._native_dir(self.client.get_logged_model(version.source.removeprefix("models:/"))
                                    .artifact_location)
        return self._native_dir(version.source)  # registered with the logged model's own location

    def _native_dir(self, artifact_location: str) -> Path:
        """A logged model's native files on this disk: re-rooted under this lake when the lake moved, and refused
        when the path leads outside the lake's artifact root."""
        path = local_path(artifact_location)
        root = self.lake.mlflow_artifacts.resolve()
        if self.local:
            parts = path.parts
            anchors = [i for i in range(len(parts) - 1) if parts[i:i + 2] == ("mlflow", "artifacts")]
            if anchors and not path.is_relative_to(root):
                # recorded before the lake moved: the same place under the lake's artifact root
                path = root.joinpath(*parts[anchors[-1] + 2:])
            path = path.resolve()
            if not path.is_relative_to(root):
                raise UntrustedModel(f"model artifacts at {path} lie outside the lake's artifact root {root}: "
                                     "refusing to load them")
        return native_dir(path)


OWNER_PID_TAG, OWNER_HOST_TAG = "poe.pid", "poe.host"


def _host() -> str:
    import socket

    return socket.gethostname()


class UntrustedModel(ValueError):
    """A model whose files cannot be trusted: outside the artifact root, or not matching their checksums."""


CHECKSUMS_TAG = "poe.checksums"
ARTIFACT_KEY = "model"  # the native files, under <MLflow model>/artifacts/model/ (``mlflow_models``)


def native_dir(pyfunc_dir: Path) -> Path:
    """Where the native files sit inside a saved MLflow model."""
    return Path(pyfunc_dir) / "artifacts" / ARTIFACT_KEY


_VERIFIED: dict[tuple[str, str], tuple] = {}  # (folder, recorded checksums) -> its files' signature when they matched
_RECENT_S = 2.0  # a file changed this recently could change again within the clock's tick: never trusted from cache


def forget_verified() -> None:
    _VERIFIED.clear()


def _files_signature(directory: Path) -> tuple | None:
    """Each file's relative path, size, inode, modification and change time; None when a file changed just now."""
    directory = Path(directory)
    return files_signature(sorted(directory.rglob("*")), directory)


def files_signature(paths: Iterable[Path], base: Path | None = None) -> tuple | None:
    """(path, size, inode, modification and change time) of each regular file, to tell files that did not change
    since they were read from any that did; None when one changed too recently to tell."""
    now = time.time_ns()
    out = []
    for p in paths:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            continue
        if now - max(st.st_mtime_ns, st.st_ctime_ns) < _RECENT_S * 1e9:
            return None
        out.append((str(p.relative_to(base) if base else p), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (SQLAlchemy's form: four slashes for an absolute path)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def _read_only(db: Path):
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        yield con
    finally:
        con.close()


def _has_column(con: sqlite3.Connection, table: str, column: str) -> bool:
    return any(row[1] == column for row in con.execute(f"PRAGMA table_info({table})"))


def _query_versions(con: sqlite3.Connection, names: list[str], alias: str | None, version: str | None,
                    workspace: str | None) -> dict[str, RegisteredVersion]:
    """MLflow's own rule (``get_model_version_by_alias``, ``get_model_version``): a version not deleted."""
    marks = ",".join("?" * len(names))
    same_ws = " AND {t}.workspace = v.workspace" if workspace else ""
    if alias is not None:
        sql = (f"SELECT v.name, v.version, v.source, t.value FROM registered_model_aliases a "
               f"JOIN model_versions v ON v.name = a.name AND v.version = a.version{same_ws.format(t='a')} "
               f"LEFT JOIN model_version_tags t ON t.name = v.name AND t.version = v.version AND t.key = ?"
               f"{same_ws.format(t='t')} "
               f"WHERE a.alias = ? AND v.name IN ({marks}) AND v.current_stage != ?")
        params: list = [CHECKSUMS_TAG, alias, *names, "Deleted_Internal"]
    else:
        sql = (f"SELECT v.name, v.version, v.source, t.value FROM model_versions v "
               f"LEFT JOIN model_version_tags t ON t.name = v.name AND t.version = v.version AND t.key = ?"
               f"{same_ws.format(t='t')} "
               f"WHERE v.version = ? AND v.name IN ({marks}) AND v.current_stage != ?")
        params = [CHECKSUMS_TAG, int(version), *names, "Deleted_Internal"]
    if workspace:
        sql += " AND v.workspace = ?"
        params.append(workspace)
    return {name: RegisteredVersion(name, str(number), source or "",
                                    {CHECKSUMS_TAG: value} if value is not None else {})
            for name, number, source, value in con.execute(sql, params)}


def checksums(directory: Path) -> dict[str, str]:
    """SHA-256 of every file in a model folder, by relative path."""
    import hashlib

    directory = Path(directory)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _feature_names(native: Path) -> list[str]:
    return json.loads((native / "ensemble.json").read_text()).get("feature_names", [])


def _example_forecast(native: Path, kind: str, example: pl.DataFrame):
    """The model's forecast of the example rows, for the signature's output."""
    import numpy as np

    from poe_pipeline.modeling import Ensemble

    if kind == "global":
        return Ensemble(native).predict(example)
    return np.zeros(example.height)  # a partition's output has the same shape; its values need the global model


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
