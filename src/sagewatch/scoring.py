"""Batch scoring: anomaly score, alarm decision and top sensor per row.

Rows are scored in blocks in time order per entity; each block is preceded by the
detector's ``context_rows`` earlier rows, so a row's score does not depend on where
a block starts. ``is_anomaly`` is the detector's alarm rule (at least
``alarm_min_rows`` of the last ``alarm_window`` rows above the threshold; with the
default 1 of 1, simply ``anomaly_score > threshold``).

The output has the contract columns ``timestamp, machine_id, anomaly_score,
threshold, is_anomaly, top_sensor``, then ``in_reference`` (1 for rows inside the
period the detector was fitted on, which evaluation leaves out) and ``label`` plus
passthrough columns when the features carry them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from sagewatch.detector import Detector
from sagewatch.models import row_positions
from sagewatch.schema import ENTITY, LABEL, TIMESTAMP

log = logging.getLogger(__name__)

SCORE_COLUMNS = (
    "anomaly_score",
    "threshold",
    "is_anomaly",
    "top_sensor",
    "in_reference",
)
SCORE_PASSTHROUGH = (LABEL, "anomaly_kind", "changepoint")
# Rows per block handed to the detector, which pads its own network batches, so a
# row's score does not depend on how the table was cut into blocks or chunks.
BATCH_ROWS = 65_536


def score_features(
    features: pl.DataFrame,
    detector: Detector,
    *,
    source: str = "features",
    batch_rows: int = BATCH_ROWS,
    progress: bool = False,
    passthrough: Sequence[str] = SCORE_PASSTHROUGH,
    log_summary: bool = True,
    continued: tuple[str, int] | None = None,
) -> pl.DataFrame:
    """Score every row of a features table with a fitted detector.

    Each block carries the detector's context rows, so the scores of a table cut
    into chunks are bit for bit those of the whole table.

    The first ``detector.warmup_rows`` rows of each entity are never flagged (their
    windows are incomplete). ``continued`` = ``(entity, rows)`` says that entity's
    first row here is its row number ``rows`` (a chunk that starts inside it).

    Raises:
        SchemaMismatchError: the table lacks features the detector needs.
    """
    detector.check_columns(features.columns, source)
    names = detector.feature_names_
    context = detector.context_rows
    entity, run_starts = _entities(features)
    position = _positions(features, entity, run_starts, continued)
    scores = np.empty(features.height)
    top = np.empty(features.height, dtype=np.int64)
    bar = tqdm(
        total=features.height,
        desc="score",
        unit="row",
        unit_scale=True,
        disable=not progress,
        leave=False,
    )
    for start in range(0, features.height, batch_rows):
        # Earlier rows give the first rows of the block their sequence context.
        lead = min(start, context)
        stop = min(start + batch_rows, features.height)
        block = features.slice(start - lead, stop - start + lead).select(names)
        score, contributions = detector.score_rows(
            block.to_numpy(),
            entity[start - lead : stop],
            position[start - lead : stop],
        )
        scores[start:stop] = score[lead:]
        top[start:stop] = contributions[lead:].argmax(axis=1)
        bar.update(stop - start)
    bar.close()

    threshold = detector.threshold_
    sensors = pl.Series("top_sensor", detector.sensors_, dtype=pl.String)
    out = features.select(TIMESTAMP, ENTITY).with_columns(
        pl.Series("anomaly_score", scores),
        pl.lit(threshold, dtype=pl.Float64).alias("threshold"),
        pl.Series("is_anomaly", _flags(entity, position, detector, scores)),
        sensors.gather(top),
        _in_reference(
            features, entity, run_starts, getattr(detector, "reference_end_", None)
        ),
    )
    extra = [c for c in passthrough if c in features.columns]
    out = out.with_columns(features.select(extra)) if extra else out
    if not log_summary:
        return out
    run_lengths = np.diff(np.r_[run_starts, len(entity)])
    lengths = dict(zip(entity[run_starts], run_lengths.tolist(), strict=True))
    warn_short_entities(lengths, detector.warmup_rows)
    log.info(
        "scored %d rows: %d flagged (threshold %.6g, %.2f %%)",
        out.height,
        int(out["is_anomaly"].sum()),
        threshold,
        100.0 * float(out["is_anomaly"].mean() or 0.0),
    )
    return out


def warn_short_entities(rows: Mapping[str, int], warmup: int) -> None:
    """Warn about entities whose rows are all warm-up rows (never flagged)."""
    short = sorted(str(name) for name, n in rows.items() if n <= warmup)
    if short:
        log.warning(
            "%d entit%s no more rows than the %d warm-up rows (rolling window, "
            "sequence or receptive field, alarm window), so none of their rows can "
            "be flagged: %s",
            len(short),
            "y has" if len(short) == 1 else "ies have",
            warmup,
            short[:5],
        )


def _entities(features: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each row's entity name (rows,) and the first row of each run of one entity.

    Built from the runs: a table holds few runs of many rows each.
    """
    runs = features[ENTITY].cast(pl.String).rle().struct.unnest()
    lengths = runs["len"].to_numpy()
    names = np.empty(len(lengths), dtype=object)
    names[:] = runs["value"].to_list()
    starts = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64)
    return np.repeat(names, lengths), starts[: len(lengths)]


def _positions(
    features: pl.DataFrame,
    entity: np.ndarray,
    run_starts: np.ndarray,
    continued: tuple[str, int] | None,
) -> np.ndarray:
    """Each row's number within its entity, counting rows of earlier chunks."""
    if len(set(entity[run_starts].tolist())) == len(run_starts):
        position = row_positions(entity)
    else:  # an entity in several runs: count its rows across them
        position = features.select(pl.int_range(pl.len()).over(ENTITY))
        position = position.to_numpy()[:, 0]
    if continued is not None:
        name, offset = continued
        position = np.where(entity == name, position + offset, position)
    return position


def _flags(
    entity: np.ndarray,
    position: np.ndarray,
    detector: Detector,
    scores: np.ndarray,
) -> np.ndarray:
    """The alarm rule, silenced on each entity's warm-up rows."""
    flags = np.asarray(detector.alarms(scores, entity), dtype=np.int8)
    warm = position < detector.warmup_rows
    return np.where(warm, 0, flags).astype(np.int8)


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _in_reference(
    features: pl.DataFrame,
    entity: np.ndarray,
    run_starts: np.ndarray,
    reference_end: dict[str, str] | None,
) -> pl.Series:
    """1 for rows at or before the end of their entity's reference period."""
    if not reference_end:
        return pl.Series("in_reference", np.zeros(features.height, dtype=np.int8))
    stamps = features[TIMESTAMP].dt.convert_time_zone("UTC").dt.epoch("us")
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    ends = {
        name: (_utc(datetime.fromisoformat(end)) - epoch) // timedelta(microseconds=1)
        for name, end in reference_end.items()
    }
    lengths = np.diff(np.r_[run_starts, len(entity)])
    # An entity without a reference period never counts as inside one.
    run_end = [ends.get(name, np.iinfo(np.int64).min) for name in entity[run_starts]]
    end = np.repeat(np.asarray(run_end, dtype=np.int64), lengths)
    flag = stamps.fill_null(np.iinfo(np.int64).max).to_numpy() <= end
    return pl.Series("in_reference", flag.astype(np.int8))
