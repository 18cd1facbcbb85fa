"""The reference period, held-out rows, training sequences and the training loop."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch

from sagewatch import detector as detector_module
from sagewatch import sampling, thresholds
from sagewatch.config import ModelSettings, ReferenceSettings, Settings
from sagewatch.detector import Detector
from sagewatch.errors import InputError
from sagewatch.models import window_index
from sagewatch.networks import ConvAutoencoder
from sagewatch.reference import ArrayReference, Layout
from sagewatch.training import (
    fit_autoencoder,
    fit_detector,
    reference_mask,
    training_sequences,
)

NAMES = ["s1__value", "s2__value", "s3__value"]
SMALL = {
    "sequence_length": 4,
    "hidden_dims": [4],
    "encoding_dim": 2,
    "kernel_size": 3,
    "epochs": 4,
}


def _frame(lengths: dict[str, int]) -> pl.DataFrame:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    rows = [
        (start + timedelta(minutes=i), name, float(i))
        for name, n in lengths.items()
        for i in range(n)
    ]
    return pl.DataFrame(
        rows, schema=["timestamp", "machine_id", "s__value"], orient="row"
    ).with_columns(pl.col("timestamp").dt.cast_time_unit("us"))


def test_reference_mask_train_rows_per_entity() -> None:
    mask = reference_mask(_frame({"a": 4, "b": 3}), ReferenceSettings(train_rows=2))

    assert mask.to_list() == [True, True, False, False, True, True, False]


def test_reference_mask_train_until_is_inclusive() -> None:
    until = datetime(2024, 1, 1, 0, 1)  # naive: read as UTC

    mask = reference_mask(_frame({"a": 3}), ReferenceSettings(train_until=until))

    assert mask.to_list() == [True, True, False]


def test_reference_mask_fraction_rounds_up() -> None:
    settings = ReferenceSettings(train_fraction=0.5)

    assert reference_mask(_frame({"a": 3}), settings).to_list() == [True, True, False]


def test_held_out_is_the_tail_of_each_entity() -> None:
    layout = Layout.split(["a", "b"], [10, 5], 0.2)

    assert layout.held.tolist() == [2, 1]  # the last 2 of a's rows, the last of b's
    assert layout.train.tolist() == [8, 4]


def test_held_out_none_when_fraction_zero() -> None:
    assert not Layout.split(["a"], [10], 0.0).held.any()


def test_training_sequences_stride_and_held_out_rows() -> None:
    entity = np.array(["a"] * 6)
    held = np.array([0, 0, 0, 0, 1, 1], dtype=bool)
    settings = ModelSettings(sequence_length=3, sequence_stride=2)

    train, val = training_sequences(entity, held, settings, length=3)

    assert train.tolist() == [[0, 0, 0], [0, 1, 2]]  # ending at rows 0 and 2
    assert val.tolist() == [[2, 3, 4], [3, 4, 5]]


def test_training_sequences_sampled_down_to_the_cap() -> None:
    entity = np.array(["a"] * 100)
    settings = ModelSettings(sequence_length=2, sequence_stride=1, max_train_samples=10)

    train, _ = training_sequences(entity, np.zeros(100, bool), settings, length=2)

    assert len(train) == 10
    assert np.all(np.diff(train[:, 1]) > 0)  # kept in time order


def _data(rows: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(rows, 3)).astype(np.float32)
    index = window_index(np.array(["a"] * rows), 4)
    return z, index[:48], index[48:]


def _build() -> ConvAutoencoder:
    return ConvAutoencoder(3, 4, [4], 2, 3)


def test_training_sequences_validation_stride_counts_back_from_the_last() -> None:
    entity = np.array(["a"] * 8)
    held = np.array([0, 0, 0, 1, 1, 1, 1, 1], dtype=bool)
    settings = ModelSettings(sequence_length=2, sequence_stride=4)

    train, val = training_sequences(
        entity, held, settings, length=2, validation_stride=2
    )

    assert train.tolist() == [[0, 0]]
    assert val.tolist() == [[2, 3], [4, 5], [6, 7]]  # ending at rows 3, 5 and 7


def test_fit_autoencoder_is_deterministic_for_a_seed() -> None:
    z, train, val = _data()
    settings = ModelSettings(**SMALL)

    first, summary = fit_autoencoder(_build, z, train, val, settings, seed=3)
    second, _ = fit_autoencoder(_build, z, train, val, settings, seed=3)
    other, _ = fit_autoencoder(_build, z, train, val, settings, seed=4)

    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name])
    assert not torch.equal(
        first.state_dict()["encoder.0.weight"], other.state_dict()["encoder.0.weight"]
    )
    assert summary["seed"] == 3
    assert summary["n_train"] == 48 and summary["n_val"] == 16
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4]


def test_fit_autoencoder_stops_early_without_improvement() -> None:
    z, train, val = _data()
    settings = ModelSettings(
        **{**SMALL, "epochs": 20, "patience": 2, "learning_rate": 1e-12}
    )

    _, summary = fit_autoencoder(_build, z, train, val, settings, seed=0)

    assert summary["best_epoch"] == 1
    assert summary["epochs_run"] == 3
    assert not summary["stopped_at_epoch_limit"] and not summary["still_improving"]


def test_a_run_to_the_epoch_limit_says_so_and_whether_it_still_improved() -> None:
    z, train, val = _data()
    stuck = ModelSettings(
        **{**SMALL, "epochs": 3, "patience": 5, "learning_rate": 1e-12}
    )
    learning = ModelSettings(**{**SMALL, "epochs": 3, "patience": 5})

    _, flat = fit_autoencoder(_build, z, train, val, stuck, seed=0)
    _, falling = fit_autoencoder(_build, z, train, val, learning, seed=0)

    assert flat["epochs_run"] == 3 and flat["best_epoch"] == 1
    assert flat["stopped_at_epoch_limit"] and not flat["still_improving"]
    assert falling["best_epoch"] == 3
    assert falling["stopped_at_epoch_limit"] and falling["still_improving"]


def test_fit_detector_needs_reference_rows() -> None:
    settings = Settings().with_overrides({"train_until": "2000-01-01T00:00:00"})

    with pytest.raises(InputError, match="reference period holds 0 rows"):
        fit_detector(_frame({"a": 5}), ["s__value"], settings)


def test_fit_detector_records_reference_and_threshold_source() -> None:
    settings = Settings().with_overrides(
        {"detector": "pca", "train_rows": 20, "validation_fraction": 0.25}
    )
    frame = _frame({"a": 30, "b": 30}).with_columns(
        pl.col("s__value").sin().alias("s__value"),
        pl.col("s__value").cos().alias("t__value"),
    )

    detector, info = fit_detector(frame, ["s__value", "t__value"], settings)

    assert info["reference_rows"] == 40
    assert info["train_rows"] == 30 and info["validation_rows"] == 10
    assert detector.threshold_rule_["n_rows"] == 10
    assert detector.reference_end_ == {
        "a": "2024-01-01T00:19:00+00:00",
        "b": "2024-01-01T00:19:00+00:00",
    }


def test_fit_detector_too_few_rows_to_hold_out() -> None:
    settings = Settings().with_overrides({"detector": "pca", "train_rows": 2})

    detector, info = fit_detector(_frame({"a": 5}), ["s__value"], settings)

    assert info["validation_rows"] == 0
    assert detector.threshold_rule_["computed_on"].startswith("training rows")


@pytest.mark.parametrize("architecture", ["dense", "causal"])
def test_sampled_threshold_uses_the_whole_table_scores_of_its_rows(
    monkeypatch: pytest.MonkeyPatch, architecture: str
) -> None:
    # Blocks of 16 held-out rows, tiles of 8 rows, batches of 7 scored rows: all
    # cut the entities.
    monkeypatch.setattr(sampling, "CALIBRATION_BLOCK", 16)
    monkeypatch.setattr(detector_module, "TILE_ROWS", 8)
    monkeypatch.setattr(thresholds, "_CALIBRATION_BATCH", 7)
    rng = np.random.default_rng(3)
    x = np.sin(np.arange(600)[:, None] / 9 + np.arange(3)) + rng.normal(
        0, 0.1, (600, 3)
    )
    entity = np.repeat(["a", "b"], [330, 270])
    held = np.r_[np.arange(330) >= 260, np.arange(270) >= 210]
    settings = ModelSettings(
        architecture=architecture,
        hidden_dims=[4, 4] if architecture == "causal" else [4],
        sequence_length=8,
        epochs=2,
        max_calibration_rows=40,
        threshold_rule="quantile",
    )

    detector = Detector(settings).fit(x, entity, NAMES, validation=held)

    layout = ArrayReference(x, entity, held).layout
    sample = sampling.plan_sample(layout, settings, **detector._sample_shape())
    rows = sample.rows[sample.scored[sample.calibration]]
    assert len(rows) == detector.threshold_rule_["n_rows"] == 32  # two blocks
    assert held[rows].all()
    whole, _ = detector.score_rows(x, entity)
    expected, _ = thresholds.learn_threshold(whole[rows], settings, "held-out")
    assert detector.threshold_ == expected
    assert detector.training_["sample"]["calibration"] == {
        "used": 32,
        "of": 130,
        "block_rows": 16,
    }


def test_fit_detector_records_the_samples() -> None:
    settings = Settings().with_overrides(
        {
            "train_rows": 150,
            "validation_fraction": 0.2,
            "max_train_samples": 50,
            "max_calibration_rows": 1000,
            "epochs": 1,
        }
    )
    frame = _frame({"a": 200, "b": 200}).with_columns(
        pl.col("s__value").sin().alias("s__value"),
        pl.col("s__value").cos().alias("t__value"),
    )

    detector, info = fit_detector(frame, ["s__value", "t__value"], settings)

    assert info["train_rows"] == 240 and info["validation_rows"] == 60
    assert info["sample"] == detector.training_["sample"]
    assert info["sample"]["training"] == {"used": 50, "of": 240}
    assert info["sample"]["validation"] == {"used": 12, "of": 60}
    assert info["sample"]["calibration"]["used"] == 60
    assert detector.threshold_rule_["n_rows"] == 60
    assert detector.training_["members"][0]["n_train"] == 50
