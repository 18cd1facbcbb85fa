"""Batch scoring: anomaly score, threshold decision and top sensor per row.

The output has the contract columns ``timestamp, machine_id, anomaly_score,
threshold, is_anomaly, top_sensor``, then ``in_reference`` (1 for rows inside the
period the detector was fitted on, which evaluation leaves out) and ``label`` plus
passthrough columns when the features carry them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from sagewatch.detector import Detector
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
# Rows per model call. Every call gets exactly this many rows (the last block is
# padded), so a row's score does not depend on how the table was cut into chunks:
# matrix products round differently for different numbers of rows.
BATCH_ROWS = 8_192


def score_features(
    features: pl.DataFrame,
    detector: Detector,
    *,
    source: str = "features",
    batch_rows: int = BATCH_ROWS,
    progress: bool = False,
    passthrough: Sequence[str] = SCORE_PASSTHROUGH,
    log_summary: bool = True,
) -> pl.DataFrame:
    """Score every row of a features table with a fitted detector.

    The model sees blocks of exactly ``batch_rows`` rows, so the scores of a table
    cut into chunks are bit for bit those of the whole table.

    Raises:
        SchemaMismatchError: the table lacks features the detector needs.
    """
    detector.check_columns(features.columns, source)
    names = detector.feature_names_
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
    starts = range(0, features.height, batch_rows)

    def work(start: int) -> None:
        block = features.slice(start, batch_rows).select(names).to_numpy()
        rows = len(block)
        padded = np.zeros((batch_rows, len(names)))  # (batch, features)
        padded[:rows] = block
        errors = detector.errors(padded)[:rows]  # (rows, features)
        scores[start : start + rows] = errors.mean(axis=1)
        top[start : start + rows] = detector.attribution(errors).argmax(axis=1)
        bar.update(rows)

    with _one_thread_per_call(), ThreadPoolExecutor(_workers(len(starts))) as pool:
        list(pool.map(work, starts))
    bar.close()

    threshold = detector.threshold_
    sensors = pl.Series("top_sensor", detector.sensors_, dtype=pl.String)
    out = features.select(TIMESTAMP, ENTITY).with_columns(
        pl.Series("anomaly_score", scores),
        pl.lit(threshold, dtype=pl.Float64).alias("threshold"),
        pl.Series("is_anomaly", (scores > threshold).astype(np.int8)),
        sensors.gather(top),
        _in_reference(features, getattr(detector, "reference_end_", None)),
    )
    extra = [c for c in passthrough if c in features.columns]
    out = out.with_columns(features.select(extra)) if extra else out
    if not log_summary:
        return out
    log.info(
        "scored %d rows: %d above threshold %.6g (%.2f %%)",
        out.height,
        int(out["is_anomaly"].sum()),
        threshold,
        100.0 * float(out["is_anomaly"].mean() or 0.0),
    )
    return out


def _in_reference(
    features: pl.DataFrame, reference_end: dict[str, str] | None
) -> pl.Series:
    """1 for rows at or before the end of their entity's reference period."""
    if not reference_end:
        return pl.Series("in_reference", np.zeros(features.height, dtype=np.int8))
    ends = pl.DataFrame(
        {
            ENTITY: list(reference_end),
            "__end": [datetime.fromisoformat(v) for v in reference_end.values()],
        },
        schema_overrides={"__end": pl.Datetime("us", "UTC")},
    )
    joined = features.select(TIMESTAMP, ENTITY).join(
        ends, on=ENTITY, how="left", maintain_order="left"
    )
    flag = (joined[TIMESTAMP] <= joined["__end"]).fill_null(False)
    return flag.cast(pl.Int8).alias("in_reference")


def _workers(blocks: int) -> int:
    return max(1, min(blocks, os.cpu_count() or 1, 4))


@contextmanager
def _one_thread_per_call() -> Iterator[None]:
    """Run each model call on one thread; blocks run side by side instead.

    Splitting an 8192-row product over several threads costs more in waiting than
    it gains, most of all on a busy machine; whole blocks in parallel do not wait.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
