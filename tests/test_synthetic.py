"""The synthetic generator: deterministic, realistic structure, labelled anomalies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from sagewatch.config import GenerateSettings, Settings
from sagewatch.pipeline import stage_generate
from sagewatch.synthetic import ANOMALY_KINDS, generate


def _frame(seed: int = 7, **kw: object) -> pl.DataFrame:
    settings = GenerateSettings(n_samples=1500, n_machines=4, **kw)
    return generate(settings, seed=seed)


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    settings = Settings().with_overrides({"n_samples": 300, "n_machines": 2})
    stage_generate(settings, str(tmp_path / "a"))
    stage_generate(settings, str(tmp_path / "b"))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["sensor_data-machine_001.csv", "sensor_data-machine_002.csv"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (
            tmp_path / "b" / name
        ).read_bytes()


def test_different_seeds_differ() -> None:
    assert not _frame(seed=1).equals(_frame(seed=2))


def test_schema_and_row_count() -> None:
    frame = _frame()
    assert frame.columns == [
        "timestamp",
        "machine_id",
        "temperature",
        "vibration",
        "pressure",
        "current",
        "rpm",
        "anomaly",
        "anomaly_kind",
    ]
    assert frame.height == 4 * 1500
    assert frame["machine_id"].unique().sort().to_list() == [
        "machine_001",
        "machine_002",
        "machine_003",
        "machine_004",
    ]
    assert frame.schema["timestamp"] == pl.Datetime("us", "UTC")
    step = frame.filter(pl.col("machine_id") == "machine_001")["timestamp"].diff()
    assert step.drop_nulls().dt.total_seconds().unique().to_list() == [60]


def test_anomalies_are_labelled_after_the_reference_half_only() -> None:
    frame = _frame()
    position = pl.int_range(pl.len()).over("machine_id")
    early = frame.filter(position < 750)
    assert early["anomaly"].sum() == 0
    assert (early["anomaly_kind"] == "").all()
    late = frame.filter(position >= 750)
    assert 0 < late["anomaly"].sum() <= 0.05 * frame.height
    labelled = frame.filter(pl.col("anomaly") == 1)
    assert (labelled["anomaly_kind"] != "").all()


def test_at_least_five_kinds_are_injected() -> None:
    kinds = set(_frame()["anomaly_kind"].unique()) - {""}
    assert kinds <= set(ANOMALY_KINDS)
    assert len(kinds) >= 5


def test_machines_have_their_own_levels_and_sensors_correlate() -> None:
    healthy = _frame().filter(pl.col("anomaly") == 0)
    means = healthy.group_by("machine_id").agg(pl.col("temperature").mean())[
        "temperature"
    ]
    assert means.max() - means.min() > 1.0  # machine-specific operating level
    one = healthy.filter(pl.col("machine_id") == "machine_001")
    corr = np.corrcoef(one["temperature"].to_numpy(), one["current"].to_numpy())[0, 1]
    assert corr > 0.8  # both follow the shared load signal


def test_no_anomalies_when_fraction_is_zero() -> None:
    assert _frame(anomaly_fraction=0.0)["anomaly"].sum() == 0
