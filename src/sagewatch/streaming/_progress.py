"""Progress of a chunked stage: a bar while it runs, a log line when it ends."""

from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class Progress:
    """Rows done of a total (when known) and the rate: a bar and a closing log line."""

    def __init__(self, name: str, total: int | None, *, show: bool) -> None:
        self.name, self.total, self.done = name, total, 0
        self.started = time.perf_counter()
        self.bar = tqdm(
            total=total,
            desc=name,
            unit="row",
            unit_scale=True,
            disable=not show,
            leave=False,
        )

    def update(self, rows: int) -> None:
        self.done += rows
        self.bar.update(rows)
        log.debug(
            "%s: %d of %s rows, %.0f rows/s",
            self.name,
            self.done,
            self.total if self.total is not None else "?",
            self.rate,
        )

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.started, 1e-9)

    def close(self) -> None:
        self.bar.close()
        log.info(
            "%s: %d rows in %.2f s (%.0f rows/s)",
            self.name,
            self.done,
            time.perf_counter() - self.started,
            self.rate,
        )
