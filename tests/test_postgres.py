"""The production instance, deploy/dagster.yaml, on a real PostgreSQL server started for these tests.

A materialization and a schedule tick run against it, and what they wrote is read back from PostgreSQL itself.
MLflow's tracking store and registry run on the same server. The rest of deploy/, which needs a cluster, is linted.
Without PostgreSQL binaries the server tests skip, unless REQUIRE_POSTGRES=1 (CI) makes that a failure.
"""

import json
import shutil
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import psycopg2
import pytest
from e2e.postgres import start_server

from conftest import REPO, SAMPLE
from poe_pipeline.assets.ingestion import SCHEDULED_TIME_TAG, ingestion_every_5_minutes
from poe_pipeline.definitions import defs
from poe_pipeline.ingestion import poll_slot, read_snapshots
from poe_pipeline.lake import Lake
from poe_pipeline.resources import LakeResource, MonitoringResource, PoeWatchResource, RunScopeResource
from poe_pipeline.sources.replay import ReplayServer
from poe_pipeline.warehouse import query

pytestmark = pytest.mark.postgres
warnings.filterwarnings("ignore", category=dg.BetaWarning)


@pytest.fixture(scope="module")
def pg():
    server = start_server()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg) -> str:
    return pg.create_database(f"dagster_{uuid.uuid4().hex[:8]}")


@pytest.fixture
def pg_instance(pg_url, tmp_path, monkeypatch):
    """deploy/dagster.yaml as DAGSTER_HOME/dagster.yaml, with only DAGSTER_PG_URL set."""
    home = tmp_path / "pg_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_PG_URL", pg_url)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


def _sql(url: str, statement: str, params: tuple = ()) -> list[tuple]:
    dsn = url.replace("postgresql+psycopg2://", "postgresql://")
    with psycopg2.connect(dsn) as con, con.cursor() as cur:
        cur.execute(statement, params)
        rows = cur.fetchall()
    con.close()
    return rows


def test_deploy_instance_keeps_everything_in_postgres(pg_instance):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    assert isinstance(pg_instance.run_storage, PostgresRunStorage)
    assert isinstance(pg_instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(pg_instance.schedule_storage, PostgresScheduleStorage)
    limits = pg_instance.run_coordinator.get_run_queue_config().tag_concurrency_limits
    assert {"key": "poe/queue", "value": "ingestion", "limit": 1} in limits
    assert pg_instance.run_monitoring_enabled


def test_deploy_yaml_holds_no_secret():
    text = (REPO / "deploy" / "dagster.yaml").read_text()
    assert "env: DAGSTER_PG_URL" in text
    config_lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("://" in line or "password" in line.lower() for line in config_lines)


def test_materialization_on_postgres(pg_instance, pg_url, tmp_path):
    history = tmp_path / "history"
    history.mkdir()
    (history / "Sanctum.currency.csv.gz").symlink_to(SAMPLE / "Sanctum.currency.csv.gz")
    lake = Lake(tmp_path / "lake")
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=dg.AssetSelection.assets("historical_prices", "daily_prices"),
        resources={"lake": LakeResource(root=str(lake.root)), "poe_watch": PoeWatchResource(),
                   "run_scope": RunScopeResource(history_dirs=[str(history)], league="Sanctum"),
                   "monitoring": MonitoringResource()},
        instance=pg_instance,
    )
    assert result.success
    rows = query(lake, "SELECT count(*) AS n, count(DISTINCT currency) AS c FROM daily_prices WHERE league = 'Sanctum'")
    assert rows["n"].item() > 10_000 and rows["c"].item() > 100

    # read back from PostgreSQL itself, not through Dagster's cache
    assert _sql(pg_url, "SELECT status FROM runs WHERE run_id = %s", (result.run_id,)) == [("SUCCESS",)]
    materialized = _sql(pg_url, "SELECT DISTINCT asset_key FROM event_logs WHERE run_id = %s AND "
                                "dagster_event_type = 'ASSET_MATERIALIZATION'", (result.run_id,))
    assert {key for (key,) in materialized} == {'["historical_prices"]', '["daily_prices"]'}
    checks = _sql(pg_url, "SELECT check_name, execution_status FROM asset_check_executions WHERE run_id = %s",
                  (result.run_id,))
    assert dict(checks)["daily_prices_unique_keys"] == "SUCCEEDED"
    assert pg_instance.get_latest_materialization_event(dg.AssetKey("daily_prices")).run_id == result.run_id


def test_schedule_tick_on_postgres(pg_instance, pg_url, tmp_path):
    """The 5-minute schedule evaluated on the PostgreSQL instance: its run polls the replay server and appends a
    snapshot; while that run is in progress, the next tick is skipped."""
    lake = Lake(tmp_path / "lake")
    tick = poll_slot(datetime.now(UTC))
    job = defs.resolve_job_def("ingestion_job")
    request = ingestion_every_5_minutes(dg.build_schedule_context(pg_instance, tick))
    assert isinstance(request, dg.RunRequest) and request.tags[SCHEDULED_TIME_TAG] == tick.isoformat()
    with ReplayServer(SAMPLE, "Sanctum", start_day=40) as server:
        result = job.execute_in_process(
            instance=pg_instance,
            tags={**request.tags, "dagster/schedule_name": "ingestion_every_5_minutes"},
            resources={"lake": LakeResource(root=str(lake.root)),
                       "poe_watch": PoeWatchResource(base_url=server.url, league="Sanctum", min_interval_s=0)},
        )
    assert result.success
    snapshots = read_snapshots(lake)
    assert snapshots.height > 100 and snapshots["polled_at"].unique().to_list() == [tick]
    assert _sql(pg_url, "SELECT value FROM run_tags WHERE run_id = %s AND key = 'poe/queue'",
                (result.run_id,)) == [("ingestion",)]

    running = pg_instance.create_run_for_job(job, tags=dict(job.tags), status=dg.DagsterRunStatus.STARTED)
    skipped = ingestion_every_5_minutes(dg.build_schedule_context(pg_instance, tick))
    assert isinstance(skipped, dg.SkipReason) and running.run_id in skipped.skip_message


def test_mlflow_tracking_and_registry_on_postgres(pg, tmp_path):
    """MLflow's production backend: its SQLAlchemy store on PostgreSQL (the store `mlflow server` of
    deploy/k8s/mlflow.yaml serves), with a run, a metric, an artifact, a registered model and the champion alias."""
    from mlflow import MlflowClient

    backend = pg.create_database("mlflow")
    client = MlflowClient(tracking_uri=backend, registry_uri=backend)  # creates and migrates MLflow's tables
    experiment = client.create_experiment("poe-pipeline", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment, tags={"dagster_run_id": "r1", "partition_key": "Divine Orb|1d"})
    client.log_metric(run.info.run_id, "ensemble_mae_logret", 0.011)
    artifact = tmp_path / "weights.json"
    artifact.write_text('{"lightgbm": 0.5}')
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)
    client.create_registered_model("poe-divine-orb-1d")
    version = client.create_model_version("poe-divine-orb-1d", f"runs:/{run.info.run_id}/weights.json",
                                          run.info.run_id)
    client.set_registered_model_alias("poe-divine-orb-1d", "champion", version.version)
    assert client.get_model_version_by_alias("poe-divine-orb-1d", "champion").run_id == run.info.run_id
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["weights.json"]
    assert _sql(backend, "SELECT value FROM metrics WHERE run_uuid = %s", (run.info.run_id,)) == [(0.011,)]
    assert _sql(backend, "SELECT name, alias FROM registered_model_aliases") == [("poe-divine-orb-1d", "champion")]


def test_postgres_binaries_are_found_or_the_ci_fails(monkeypatch):
    from e2e import postgres

    monkeypatch.setenv("POE_PG_BIN", "/nonexistent")
    monkeypatch.setattr(postgres.shutil, "which", lambda _: None)
    monkeypatch.setenv("REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception, match="REQUIRE_POSTGRES=1"):
        postgres.require_bin_dir()
    monkeypatch.setenv("REQUIRE_POSTGRES", "0")
    with pytest.raises(pytest.skip.Exception):
        postgres.require_bin_dir()


# --- deploy/: what cannot run here is linted ----------------------------------------------------------------------

# The keys the Dagster Helm chart's schema (helm/dagster/schema in dagster-io/dagster) allows where these values set
# them; the chart rejects others (extra="forbid").
K8S_RUN_LAUNCHER_KEYS = {"image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile",
                         "envConfigMaps", "envSecrets", "envVars", "volumeMounts", "volumes", "labels",
                         "failPodOnRunFailure", "resources", "schedulerName", "securityContext", "runK8sConfig"}
QUEUED_COORDINATOR_KEYS = {"maxConcurrentRuns", "tagConcurrencyLimits", "dequeueIntervalSeconds",
                           "dequeueNumWorkers", "dequeueUseThreads"}
POSTGRESQL_KEYS = {"postgresqlScheme", "image", "enabled", "postgresqlHost", "postgresqlUsername",
                   "postgresqlPassword", "postgresqlDatabase", "postgresqlParams", "service"}
USER_DEPLOYMENT_KEYS = {"name", "image", "port", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns",
                        "env", "envConfigMaps", "envSecrets", "annotations", "nodeSelector", "affinity", "tolerations",
                        "podSecurityContext", "securityContext", "resources", "livenessProbe", "readinessProbe",
                        "startupProbe", "labels", "volumeMounts", "volumes", "schedulerName"}


def _yaml_documents(path: Path) -> list:
    import yaml

    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_helm_values_match_the_chart_and_the_local_instance():
    (values,) = _yaml_documents(REPO / "deploy" / "helm" / "values.yaml")
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher" and set(launcher["config"]) == {"k8sRunLauncher"}
    assert set(launcher["config"]["k8sRunLauncher"]) <= K8S_RUN_LAUNCHER_KEYS

    postgres = values["postgresql"]
    assert set(postgres) <= POSTGRESQL_KEYS and postgres["enabled"] is False
    assert postgres["postgresqlScheme"] == "postgresql+psycopg2" and postgres["postgresqlPassword"] == ""
    assert values["generatePostgresqlPasswordSecret"] is False and values["global"]["postgresqlSecretName"]

    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    assert set(queued) <= QUEUED_COORDINATOR_KEYS
    limits = {(lim["key"], lim["value"]): lim["limit"] for lim in queued["tagConcurrencyLimits"]}
    assert all(set(lim) <= {"key", "value", "limit"} for lim in queued["tagConcurrencyLimits"])
    assert limits[("poe/queue", "ingestion")] == 1 and limits[("poe/queue", "training")] >= 1
    for kind in ("schedule", "sensor"):
        assert set(values["retention"][kind]["purgeAfterDays"]) == {"skipped", "success", "failure", "started"}

    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert set(deployment) <= USER_DEPLOYMENT_KEYS
    _parse_dagster_grpc_args(deployment["dagsterApiGrpcArgs"])
    mounts = {m["name"] for m in launcher["config"]["k8sRunLauncher"]["volumeMounts"]}
    assert mounts == {v["name"] for v in deployment["volumes"]}  # runs see the same lake as the code server


def _parse_dagster_grpc_args(args: list[str]) -> None:
    """`dagster api grpc`'s own parser accepts the arguments, and the module they name holds the definitions."""
    import importlib

    from dagster._cli.api import grpc_command

    context = grpc_command.make_context("grpc", list(args))
    module = context.params["module_name"]
    assert isinstance(importlib.import_module(module).defs, dg.Definitions)


def test_mlflow_manifest_runs_a_valid_mlflow_server_command():
    import shlex

    from mlflow.cli import server

    deployment, service = _yaml_documents(REPO / "deploy" / "k8s" / "mlflow.yaml")
    assert (deployment["kind"], service["kind"]) == ("Deployment", "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    words = shlex.split(container["args"][0])
    assert words[:3] == ["exec", "mlflow", "server"]
    context = server.make_context("server", words[3:])
    assert context.params["backend_store_uri"] == "$MLFLOW_BACKEND_STORE_URI"  # the secret, expanded by the shell
    assert context.params["port"] == container["ports"][0]["containerPort"] == service["spec"]["ports"][0]["port"]
    assert context.params["artifacts_destination"].startswith("s3://")


def test_kubernetes_manifests_and_dockerfile_agree():
    (configmap,) = _yaml_documents(REPO / "deploy" / "k8s" / "configmap-env.yaml")
    (pvc,) = _yaml_documents(REPO / "deploy" / "k8s" / "lake-pvc.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["metadata"]["name"] == "poe-lake"
    source = "\n".join(p.read_text() for p in (REPO / "poe_pipeline").rglob("*.py"))
    unknown = [key for key in configmap["data"] if key not in source]
    assert not unknown, f"the ConfigMap sets variables nothing reads: {unknown}"
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text().splitlines()
    cmd = next(line for line in dockerfile if line.startswith("CMD "))
    args = json.loads(cmd.removeprefix("CMD "))
    assert args[:3] == ["dagster", "api", "grpc"]
    _parse_dagster_grpc_args(args[3:])
