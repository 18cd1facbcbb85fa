"""Chunked features and scoring: bounded memory whatever the number of rows.

Modules:
    _chunks    raw and feature files read in batches, cut into chunks of entities
    _features  features validated and computed chunk by chunk (stream_features)
    _quality   the quality report merged from the chunks' reports
    _writers   staged outputs: Parquet files per entity, score tables by chunk
    _scores    scores computed chunk by chunk with each entity's context
    _progress  a progress bar and the closing rate log line

Notes:
    Streamed results equal the in-memory ones exactly, quality report included:
    counts add up over chunks, the median step and time gaps come from the merged
    counts of every step, constant sensors from merged minima and maxima. Where
    chunk-by-chunk validation could differ from validating the whole input, the
    stage falls back to the in-memory path (with an INFO line saying why) and
    discards what it streamed and what validating its chunks logged (the
    in-memory path logs its own). That is the case when the input fits in one chunk
    (nothing to gain); when files differ in their columns or types, or an entity's
    rows are not contiguous; when any chunk breaks a rule (the in-memory path then
    raises the error, with its exact file, line and entity) or has a rule drop,
    sort or de-duplicate rows; when chunks find different sensors, empty sensors
    or ignored columns; when a piece of a long entity does not start later than
    the piece before, or starts with a missing reading (forward fill would need
    the piece before); when an entity name comes back in a later chunk; and when
    steps take more than ``_quality.MAX_STEP_VALUES`` distinct values. Compressed
    CSV is read whole per file.
"""

from sagewatch.streaming._chunks import (
    Chunk,
    NotGroupedError,
    entity_chunks,
    feature_chunks,
)
from sagewatch.streaming._features import (
    FEATURE_CHUNK_ROWS,
    FeaturesResult,
    stream_features,
)
from sagewatch.streaming._progress import Progress
from sagewatch.streaming._scores import (
    CHUNK_ROWS,
    ScoresResult,
    context_rows,
    stream_scores,
)
from sagewatch.streaming._writers import STAMP_KEY, stamp, write_features

__all__ = [
    "CHUNK_ROWS",
    "FEATURE_CHUNK_ROWS",
    "STAMP_KEY",
    "Chunk",
    "FeaturesResult",
    "NotGroupedError",
    "Progress",
    "ScoresResult",
    "context_rows",
    "entity_chunks",
    "feature_chunks",
    "stamp",
    "stream_features",
    "stream_scores",
    "write_features",
]
