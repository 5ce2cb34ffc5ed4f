"""The accuracy bench scores kept replays together only when they were made with the run's own settings."""

import json
import math
from datetime import date, timedelta

import numpy as np
import polars as pl
import pytest

from benchmarks.bench_accuracy import REPLAY_SETTINGS, kept_project_predictions

SETTINGS = {"currencies": 2, "refit_every": 7, "retune_every": 1000, "max_origins": 0, "origin_slice": "last",
            "horizons": [1, 3, 7], "level": 0.8}
UNIVERSES = {"Scourge": ["Divine Orb", "Chromatic Orb"], "Sentinel": ["Divine Orb", "Orb of Fusing"],
             "Kalandra": ["Divine Orb", "Vaal Orb"]}


def _kept(tmp_path, name: str, config: dict, leagues: list[str], wall: float) -> str:
    rows = pl.DataFrame({"league": leagues, "currency": ["Divine Orb"] * len(leagues),
                         "origin_date": [date(2022, 9, 1)] * len(leagues), "horizon_days": [1] * len(leagues),
                         "current_price": [200.0] * len(leagues), "predicted_price": [201.0] * len(leagues),
                         "pred_lower": [190.0] * len(leagues), "pred_upper": [210.0] * len(leagues),
                         "actual_price": [205.0] * len(leagues)})
    path = tmp_path / f"{name}.parquet"
    rows.write_parquet(path)
    path.with_suffix(".json").write_text(json.dumps({"config": config, "wall_s": wall, "refits": 3}))
    return str(path)


def _run(files: list[str], leagues: list[str], **changed) -> dict:
    return {**SETTINGS, **changed, "leagues": leagues, "kept_replays": files}


@pytest.fixture
def replays(tmp_path):
    """A two-league replay as the bench kept it before per-league files, and a one-league one as it keeps it now."""
    pair = _kept(tmp_path, "pair", {**SETTINGS, "leagues": ["Scourge", "Sentinel"], "profile": "test",
                                    "universes": {lg: UNIVERSES[lg] for lg in ("Scourge", "Sentinel")}},
                 ["Scourge", "Sentinel"], 100.0)
    one = _kept(tmp_path, "one", {**SETTINGS, "league": "Kalandra", "universe": UNIVERSES["Kalandra"],
                                  "profile": "test", "code": "abc"}, ["Kalandra"], 50.0)
    return pair, one


def test_kept_replays_of_the_same_settings_are_scored_together(replays):
    frame, wall, refits, sources = kept_project_predictions(
        _run(list(replays), ["Scourge", "Sentinel", "Kalandra"]), UNIVERSES, "test")
    assert sorted(frame["league"]) == ["Kalandra", "Scourge", "Sentinel"]
    assert (wall, refits) == (150.0, 6)
    assert [s["leagues"] for s in sources] == [["Scourge", "Sentinel"], ["Kalandra"]]
    assert sources[1]["code"] == "abc"


@pytest.mark.parametrize("setting", REPLAY_SETTINGS)
def test_a_replay_made_with_another_setting_is_refused(replays, setting):
    other = {"horizons": [1], "level": 0.9, "origin_slice": "first"}.get(setting, 99)
    with pytest.raises(ValueError, match=f"other settings: {setting}"):
        kept_project_predictions(_run(list(replays), ["Scourge", "Sentinel", "Kalandra"], **{setting: other}),
                                 UNIVERSES, "test")


def test_what_cannot_be_scored_together_is_refused(replays):
    pair, one = replays
    everyone = ["Scourge", "Sentinel", "Kalandra"]
    with pytest.raises(ValueError, match="other settings: profile"):
        kept_project_predictions(_run([one], ["Kalandra"]), UNIVERSES, "dev")
    with pytest.raises(ValueError, match="universe of Kalandra"):
        kept_project_predictions(_run([one], ["Kalandra"]), {**UNIVERSES, "Kalandra": ["Vaal Orb"]}, "test")
    with pytest.raises(ValueError, match="repeats Kalandra"):
        kept_project_predictions(_run([one, one, pair], everyone), UNIVERSES, "test")
    with pytest.raises(ValueError, match="also holds Sentinel"):
        kept_project_predictions(_run([pair, one], ["Scourge", "Kalandra"]), UNIVERSES, "test")
    with pytest.raises(ValueError, match="no kept replay holds Kalandra"):
        kept_project_predictions(_run([pair], everyone), UNIVERSES, "test")
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        kept_project_predictions(_run([pair.replace("pair", "missing")], everyone), UNIVERSES, "test")


def test_compare_replays_scores_each_on_the_rows_they_share(tmp_path, monkeypatch, capsys):
    import benchmarks.bench_features as bench_features
    from benchmarks import compare_replays
    from conftest import SAMPLE
    from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
    from poe_pipeline.sources.poe_ninja import read_dump

    prices = merge_daily_prices(daily_from_dump_rows(read_dump(SAMPLE / "Sanctum.currency.csv.gz")))
    monkeypatch.setattr(bench_features, "development_daily_prices", lambda: prices)
    divine = prices.filter(pl.col("currency") == "Divine Orb").sort("date")
    today, tomorrow = divine["price_chaos"].to_numpy()[10:30], divine["price_chaos"].to_numpy()[11:31]
    base = pl.DataFrame({"league": "Sanctum", "currency": "Divine Orb", "origin_date": divine["date"][10:30],
                         "horizon_days": 1, "current_price": today, "actual_price": tomorrow})

    def kept(name: str, predicted, rows: int = 20) -> str:
        frame = base.head(rows).with_columns(pl.Series("predicted_price", predicted[:rows]),
                                             pl.Series("pred_lower", today[:rows] * 0.5),
                                             pl.Series("pred_upper", today[:rows] * 2.0))
        path = tmp_path / f"{name}.parquet"
        frame.write_parquet(path)
        path.with_suffix(".json").write_text(json.dumps({"config": {"level": 0.8, "code": name}, "wall_s": 10.0,
                                                         "refits": 1}))
        return str(path)

    exact, still = kept("exact", tomorrow), kept("still", today, rows=15)
    assert compare_replays.main([f"exact={exact}", f"still={still}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 15  # the rows both forecast
    (perfect,), (persistence,) = (r["scores"] for r in out["replays"].values())
    assert perfect["skill"] == pytest.approx(1.0) and persistence["skill"] == pytest.approx(0.0)
    assert perfect["coverage"] == persistence["coverage"] == 1.0 and out["replays"]["exact"]["code"] == ["exact"]
    assert compare_replays.main([str(tmp_path / "missing.parquet")]) == 2


def test_readjusted_replays_equal_replays_made_with_those_priors(tmp_path):
    from benchmarks import readjust_replays
    from conftest import SAMPLE
    from poe_pipeline.forecasting import league_adjustments
    from poe_pipeline.prices import daily_from_dump_rows, merge_daily_prices
    from poe_pipeline.sources.poe_ninja import read_dump

    prices = merge_daily_prices(daily_from_dump_rows(read_dump(SAMPLE / "Sanctum.currency.csv.gz")))
    prices = prices.filter(pl.col("currency").is_in(["Divine Orb", "Orb of Alteration"])).sort("date")
    days = sorted(prices["date"].unique().to_list())[10:50]
    price = {(r["currency"], r["date"]): r["price_chaos"] for r in prices.iter_rows(named=True)}
    rng = np.random.default_rng(5)
    models = {(c, d, h): rng.normal(0, 0.03) for c in ("Divine Orb", "Orb of Alteration") for d in days for h in (1, 3)}

    def made_with(priors) -> pl.DataFrame:
        """A replay written forward, as the backtest does: each origin adjusted by the forecasts come true."""
        rows: list[dict] = []
        for day in days:
            done = [r for r in rows if r["target_date"] <= day and r["actual_logret"] is not None]
            resolved = pl.DataFrame(done) if done else pl.DataFrame()
            adjust = league_adjustments(resolved, 0.8, priors[1], priors[0]) if done else {}
            for (c, d, h), model in models.items():
                if d != day or (c, day) not in price:
                    continue
                a = adjust.get(h)
                point = model * (a.point_shrink if a else 1.0)
                half = 0.02 * h * (a.interval_scale if a else 1.0)
                target = day + timedelta(days=h)
                actual = price.get((c, target))
                rows.append({"currency": c, "origin_date": day, "horizon_days": h, "target_date": target,
                             "current_price": price[(c, day)], "predicted_logret": point, "model_logret": model,
                             "upper_logret": point + half, "interval_scale": a.interval_scale if a else 1.0,
                             "actual_logret": math.log(actual / price[(c, day)]) if actual else None,
                             "actual_price": actual})
        frame = pl.DataFrame(rows)
        p0 = pl.col("current_price")
        return frame.select(pl.lit("Sanctum").alias("league"), "currency", "origin_date",
                            pl.col("horizon_days").cast(pl.Int32), "current_price",
                            (p0 * pl.col("predicted_logret").exp()).alias("predicted_price"),
                            (p0 * (2 * pl.col("predicted_logret") - pl.col("upper_logret")).exp()).alias("pred_lower"),
                            (p0 * pl.col("upper_logret").exp()).alias("pred_upper"), "actual_price")

    wide, narrow = made_with((120, 120)), made_with((None, 10))  # (the point shrink's prior, the scale's)
    keys = ["currency", "origin_date", "horizon_days"]
    assert not np.allclose(wide.sort(keys)["pred_upper"], narrow.sort(keys)["pred_upper"])  # the priors matter here
    path = tmp_path / "kept" / "accuracy-sanctum-x.parquet"
    path.parent.mkdir()
    wide.write_parquet(path)
    path.with_suffix(".json").write_text(json.dumps({"config": {"level": 0.8}, "wall_s": 1.0, "refits": 1}))
    assert readjust_replays.main(["--made-with", "120,120", "--prior", "none,10", "--out", str(tmp_path / "out"),
                                  str(path)]) == 0
    again = pl.read_parquet(tmp_path / "out" / path.name).sort(keys)
    for column in ("predicted_price", "pred_lower", "pred_upper"):
        assert again[column].to_numpy() == pytest.approx(narrow.sort(keys)[column].to_numpy(), rel=1e-9)
    meta = json.loads((tmp_path / "out" / path.with_suffix(".json").name).read_text())
    assert meta["readjusted"]["prior"] == [None, 10]
    with pytest.raises(SystemExit):
        readjust_replays.main(["--made-with", "120", "--prior", "none,10", "--out", str(tmp_path), str(path)])
