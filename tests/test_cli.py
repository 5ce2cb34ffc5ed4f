"""``poe-pipeline run`` as a user runs it: real dumps in, daily prices in the warehouse out."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from conftest import SAMPLE
from poe_pipeline.forecasting import LEFT_OUT_OF_RUN


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "poe_pipeline.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture
def two_leagues(tmp_path) -> Path:
    history = tmp_path / "history"
    history.mkdir()
    for name in ("Kalandra", "Sanctum"):
        shutil.copy(SAMPLE / f"{name}.currency.csv.gz", history)
    return history


@pytest.mark.parametrize(("args", "message"), [
    (["--currencies", "Divine Orbb"], "Unknown currency 'Divine Orbb' in the dumps of {history}. Did you mean "
                                      "'Divine Orb'"),
    (["--currencies", " , "], "--currencies ' , ' names no currency: leave --currencies out"),
    (["--league", "Sanctom"], "Unknown league 'Sanctom' (did you mean Sanctum?)"),
    (["--lake", "{file}"], "--lake {file}: is a file, not a directory"),
    (["--lake", "/proc/poe-lake"], "--lake /proc/poe-lake: cannot write there"),  # read-only even for root
])
def test_bad_input_is_one_line_naming_the_fix(two_leagues, tmp_path, args, message):
    file = tmp_path / "a_file"
    file.write_text("")
    args = [a.format(file=file) for a in args]
    base = {"--history": str(two_leagues), "--league": "Sanctum", "--lake": str(tmp_path / "lake")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = _cli("run", *[x for kv in base.items() for x in kv])
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("poe-pipeline: error: " + message.format(history=two_leagues, file=file)), line
    assert "Traceback" not in result.stderr


def test_unknown_league_is_one_line_naming_the_fix(two_leagues, tmp_path):
    result = _cli("run", "--history", str(two_leagues), "--league", "Foo", "--lake", str(tmp_path / "lake"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"poe-pipeline: error: Unknown league 'Foo': known leagues in {two_leagues} are Kalandra, Sanctum"
    )
    assert not (tmp_path / "lake").exists()


def test_empty_history_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _cli("run", "--history", str(tmp_path / "empty"), "--league", "Sanctum")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no poe.ninja dumps" in result.stderr and "--history sample_data" in result.stderr


def test_run_imports_trains_registers_and_reports_on_the_lake_instance(tmp_path):
    """One run as a user starts it (two runs cost a minute more of CI): dumps in, the warehouse, the lake's
    Dagster instance, the registered models and the forecasts out; a second run imports nothing again."""
    history = tmp_path / "history"
    history.mkdir()
    for name in ("Archnemesis", "Sentinel", "Kalandra"):
        shutil.copy(SAMPLE / f"{name}.currency.csv.gz", history)
    # Newer poe.ninja dumps round the inverse side of a very expensive currency to 0: such rows once rejected the
    # whole dump and stopped the run. Here every Chaos Orb -> Mirror of Kalandra row of Sanctum says 0.
    lines = gzip.decompress((SAMPLE / "Sanctum.currency.csv.gz").read_bytes()).decode().splitlines()
    zeroed = [line.rsplit(";", 2)[0] + ";0;High" if ";Chaos Orb;Mirror of Kalandra;" in line else line
              for line in lines]
    assert sum(a != b for a, b in zip(lines, zeroed, strict=True)) > 50
    (history / "Sanctum.currency.csv").write_text("\n".join(zeroed) + "\n")
    lake = tmp_path / "lake"
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "POE_DATA_LAKE")}
    result = _cli("run", "--history", str(history), "--league", "Sanctum", "--lake", str(lake),
                  "--currencies", "divine orb", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[1/4] imported Archnemesis.currency.csv.gz" in result.stderr  # progress is shown
    assert "Divine Orb|7d" in result.stderr  # training progress
    assert "Divine Orb" in result.stdout and str(lake / "warehouse.duckdb") in result.stdout
    # DAGSTER_HOME defaults to the lake, never a temp dir: the run is recorded there.
    assert (lake / ".dagster" / "dagster.yaml").exists()
    assert any((lake / ".dagster").rglob("*.db"))
    with duckdb.connect(str(lake / "warehouse.duckdb"), read_only=True) as con:
        last = con.execute(
            "SELECT price_chaos, source FROM daily_prices WHERE currency = 'Divine Orb' AND league = 'Sanctum' "
            "ORDER BY date DESC LIMIT 1"
        ).fetchone()
        currencies = con.execute("SELECT count(DISTINCT currency) FROM daily_prices").fetchone()[0]
        feature_rows = con.execute("SELECT count(*) FROM features WHERE league = 'Sanctum'").fetchone()[0]
        universe = con.execute("SELECT count(*), count(*) FILTER (WHERE eligible) FROM currency_universe").fetchone()
    assert 100 < last[0] < 300 and last[1] == "poe_ninja_dump"
    assert currencies > 150  # every currency of the history, not just the modelled ones
    assert feature_rows > 15_000
    # No price floor and no past-league condition: most currencies are in, cheap bulk ones too
    assert universe[0] > 150 and universe[1] > 100

    from mlflow import MlflowClient

    uri = f"sqlite:///{lake / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for h in (1, 3, 7):
        champion = client.get_model_version_by_alias(f"poe-divine-orb-{h}d", "champion")
        run = client.get_run(champion.run_id)
        assert run.data.tags["partition_key"] == f"Divine Orb|{h}d" and run.data.tags["dagster_run_id"]
        assert run.data.metrics["persistence.mae_logret"] > 0
        # the partition names the global version it was built on, and that version exists
        built_on = run.data.tags["global_model_version"]
        assert client.get_model_version(f"poe-global-{h}d", built_on).current_stage is not None
    with duckdb.connect(str(lake / "warehouse.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT currency, horizon_days, promoted FROM model_metrics WHERE kind = 'currency' "
                           "ORDER BY 2").fetchall()
        global_rows = con.execute("SELECT horizon_days, promoted, ensemble_skill FROM model_metrics "
                                  "WHERE kind = 'global' ORDER BY 1").fetchall()
    assert rows == [("Divine Orb", 1, True), ("Divine Orb", 3, True), ("Divine Orb", 7, True)]
    assert [(h, p) for h, p, _ in global_rows] == [(1, True), (3, True), (7, True)]
    assert all(-1 < skill < 1 for *_, skill in global_rows)  # nested holdout skill, a real number
    with duckdb.connect(str(lake / "warehouse.duckdb"), read_only=True) as con:
        forecasts = con.execute("SELECT horizon_days, current_price FROM predictions WHERE currency = 'Divine Orb' "
                                "ORDER BY 1").fetchall()
        zeros = con.execute("SELECT count(*) FROM quarantine WHERE source = 'poe_ninja_dump' "
                            "AND reason LIKE 'Sanctum.currency.csv:%: Value is zero%'").fetchone()[0]
    assert [h for h, _ in forecasts] == [1, 3, 7] and all(100 < p < 300 for _, p in forecasts)
    assert zeros > 50
    # --currencies left the league's other most liquid currencies out: the warehouse and the report say so
    with duckdb.connect(str(lake / "warehouse.duckdb"), read_only=True) as con:
        gaps = con.execute("SELECT currency, count(*), max(liquidity_rank), any_value(reason) FROM forecast_gaps "
                           "WHERE league = 'Sanctum' GROUP BY 1").fetchall()
    assert len(gaps) == 29 and all(n == 3 and rank <= 30 for _, n, rank, _ in gaps)  # 30, less Divine Orb
    assert {reason for *_, reason in gaps} == {LEFT_OUT_OF_RUN}
    assert "Orb of Alteration" in {c for c, *_ in gaps}  # cheap bulk currencies are among the promised ones
    (report,) = (lake / "reports").rglob("investment_report_sanctum.md")
    assert "## Not forecast" in report.read_text() and "Not forecast: 29 currencies" in result.stdout
    _a_new_global_champion_marks_the_partitions_built_on_the_old_one_stale(lake)

    again = _cli("run", "--history", str(history), "--league", "Sanctum", "--lake", str(lake),
                 "--currencies", "divine orb", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "imported" not in again.stderr.split("daily_prices")[0].replace("already_imported", "")


def _a_new_global_champion_marks_the_partitions_built_on_the_old_one_stale(lake: Path) -> None:
    """In the run's own Dagster instance: the partitions are fresh; a global model re-materialized with the same
    champion (kept) changes nothing downstream; a new 3-day champion makes exactly the 3-day partition stale, and a
    retrain of that partition whose new version was not promoted leaves it stale (its champion is still built on
    the old global model)."""
    import dagster as dg
    from dagster._utils.test.data_versions import get_stale_status_resolver  # Dagster's own test helper

    from poe_pipeline.assets.models import (
        DATA_VERSION_TAG,
        INPUT_DATA_VERSION_PREFIX,
        INPUT_EVENT_POINTER_PREFIX,
        currency_models,
        global_models,
        global_provenance,
        global_records,
        partition_provenance,
    )
    from poe_pipeline.definitions import defs
    from poe_pipeline.lake import Lake
    from poe_pipeline.tracking import ModelTracker

    def status(h: int):
        key = dg.MultiPartitionKey({"currency": "Divine Orb", "horizon": f"{h}d"})
        resolver = get_stale_status_resolver(instance, defs.assets)
        return (resolver.get_status(currency_models.key, key).value,
                [c.reason for c in resolver.get_stale_causes(currency_models.key, key)])

    def global_event(h: int, version: int) -> None:  # what the retrain op logs for a global model at version
        tags = {**global_provenance(instance, "a-retrain", tracker, h), DATA_VERSION_TAG: f"poe-global-{h}d v{version}"}
        instance.report_runless_asset_event(dg.AssetMaterialization(global_models.key, partition=f"{h}d", tags=tags))

    def global_status(h: int):
        resolver = get_stale_status_resolver(instance, defs.assets)
        return (resolver.get_status(global_models.key, f"{h}d").value,
                [c.reason for c in resolver.get_stale_causes(global_models.key, f"{h}d")])

    def partition_event(tags: dict[str, str]) -> None:
        key = dg.MultiPartitionKey({"currency": "Divine Orb", "horizon": "3d"})
        instance.report_runless_asset_event(dg.AssetMaterialization(currency_models.key, partition=key, tags=tags))

    tracker = ModelTracker(Lake(lake))
    with dg.DagsterInstance.from_config(str(lake / ".dagster")) as instance:
        assert [status(h) for h in (1, 3, 7)] == [("FRESH", [])] * 3
        assert global_status(3) == ("FRESH", [])  # its inputs recorded: not stale against the features
        global_event(1, 1)  # a retrain that kept v1
        global_event(3, 2)  # a retrain that promoted v2
        assert status(1) == ("FRESH", []) and status(7) == ("FRESH", [])
        assert status(3) == ("STALE", ["has a new dependency data version"])
        # the partition retrained, its new version not promoted: the champion is still built on global v1
        kept = partition_provenance(global_records(instance, 3), "a-retrain", tracker, "Divine Orb", 3)
        assert kept[INPUT_DATA_VERSION_PREFIX + "global_models"] == "poe-global-3d v1"
        partition_event(kept)
        assert status(3) == ("STALE", ["has a new dependency data version"])
        latest = instance.get_latest_data_version_record(global_models.key, False, "3d")
        partition_event({**kept, INPUT_DATA_VERSION_PREFIX + "global_models": "poe-global-3d v2",  # promoted on v2
                         INPUT_EVENT_POINTER_PREFIX + "global_models": str(latest.storage_id)})
        assert status(3) == ("FRESH", [])
