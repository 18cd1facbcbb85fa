"""Deterministic synthetic sensor data with labelled, injected anomalies.

Each machine has its own operating levels; a shared load signal (a daily cycle plus a
slow random walk) drives correlated sensors, and each sensor adds its own noise.
Anomalies of six kinds are injected only after the reference period (the first half
of each machine's rows by default), and every affected row is labelled with
``anomaly = 1`` and the ``anomaly_kind``. The same settings and seed give a
byte-identical file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import polars as pl

from sagewatch.config import GenerateSettings

log = logging.getLogger(__name__)

ANOMALY_KINDS = (
    "spike",
    "level_shift",
    "drift",
    "stuck",
    "noise_burst",
    "correlation_break",
)


@dataclass(frozen=True)
class _Sensor:
    name: str
    level: float  # typical value
    gain: float  # response to the shared load signal
    noise: float  # standard deviation of its own noise


_SENSORS = (
    _Sensor("temperature", 70.0, 6.0, 0.5),
    _Sensor("vibration", 2.0, 0.4, 0.08),
    _Sensor("pressure", 30.0, 2.5, 0.3),
    _Sensor("current", 12.0, 3.0, 0.2),
    _Sensor("rpm", 1500.0, 120.0, 8.0),
    _Sensor("flow", 45.0, 5.0, 0.6),
    _Sensor("voltage", 230.0, -1.5, 0.8),
    _Sensor("humidity", 40.0, -2.0, 1.0),
    _Sensor("torque", 80.0, 9.0, 1.2),
    _Sensor("oil_level", 60.0, 0.0, 0.2),
    _Sensor("acoustic", 55.0, 4.0, 1.5),
    _Sensor("power", 9.0, 2.2, 0.15),
)


def sensor_names(n_sensors: int) -> list[str]:
    return [s.name for s in _SENSORS[:n_sensors]]


def generate(
    settings: GenerateSettings, *, seed: int, reference_fraction: float = 0.5
) -> pl.DataFrame:
    """Generate ``n_machines`` x ``n_samples`` rows with labelled anomalies.

    Anomalies start no earlier than ``reference_fraction`` of each machine's rows, so
    the default reference period is healthy.
    """
    rng = np.random.default_rng(seed)
    frames = [
        _machine(settings, rng, index, reference_fraction)
        for index in range(settings.n_machines)
    ]
    frame = pl.concat(frames)
    log.info(
        "generated %d rows: %d machines x %d samples, %d sensors, %d anomalous rows",
        frame.height,
        settings.n_machines,
        settings.n_samples,
        settings.n_sensors,
        int(frame["anomaly"].sum()),
    )
    return frame


def _machine(
    settings: GenerateSettings,
    rng: np.random.Generator,
    index: int,
    reference_fraction: float,
) -> pl.DataFrame:
    n = settings.n_samples
    step = settings.frequency_seconds
    seconds = np.arange(n) * step
    load = _load_signal(rng, seconds)  # (n,)

    sensors = _SENSORS[: settings.n_sensors]
    values = np.empty((n, len(sensors)))  # (samples, sensors)
    for j, sensor in enumerate(sensors):
        level = sensor.level * rng.uniform(0.85, 1.15)
        gain = sensor.gain * rng.uniform(0.8, 1.2)
        values[:, j] = level + gain * load + rng.normal(0.0, sensor.noise, n)

    label = np.zeros(n, dtype=np.int8)
    kind = np.full(n, "", dtype=object)
    _inject(values, label, kind, load, sensors, rng, settings, reference_fraction)

    start = settings.start
    return pl.DataFrame(
        {
            "timestamp": [start + timedelta(seconds=int(s)) for s in seconds],
            "machine_id": f"machine_{index + 1:03d}",
            **{s.name: np.round(values[:, j], 4) for j, s in enumerate(sensors)},
            "anomaly": label,
            "anomaly_kind": kind.astype(str),
        }
    ).with_columns(pl.col("timestamp").dt.replace_time_zone("UTC"))


def _load_signal(rng: np.random.Generator, seconds: np.ndarray) -> np.ndarray:
    """Daily cycle with a machine-specific phase plus a slow, bounded random walk."""
    phase = rng.uniform(0, 2 * np.pi)
    daily = np.sin(2 * np.pi * seconds / 86_400 + phase)
    walk = np.zeros(seconds.size)
    shocks = rng.normal(0.0, 0.05, seconds.size)
    for t in range(1, seconds.size):  # AR(1): mean-reverting, so levels stay realistic
        walk[t] = 0.98 * walk[t - 1] + shocks[t]
    return daily + walk


def _inject(
    values: np.ndarray,
    label: np.ndarray,
    kind: np.ndarray,
    load: np.ndarray,
    sensors: tuple[_Sensor, ...],
    rng: np.random.Generator,
    settings: GenerateSettings,
    reference_fraction: float,
) -> None:
    n = values.shape[0]
    first = int(np.ceil(reference_fraction * n))
    budget = int(settings.anomaly_fraction * n)
    if budget == 0 or n - first < 8:
        return
    cursor = first + int(rng.integers(0, max(1, (n - first) // 10)))
    order = rng.permutation(len(ANOMALY_KINDS))
    event = 0
    while budget > 0 and cursor < n - 2:
        name = ANOMALY_KINDS[order[event % len(ANOMALY_KINDS)]]
        length = 2 if name == "spike" else int(rng.integers(15, 40))
        length = min(length, n - cursor, budget if budget > 1 else 1)
        rows = slice(cursor, cursor + length)
        j = int(rng.integers(0, len(sensors)))
        _apply(name, values, rows, j, load, sensors[j], rng)
        label[rows] = 1
        kind[rows] = name
        budget -= length
        event += 1
        cursor += length + int(
            rng.integers(length + 20, max(length + 21, (n - first) // 6))
        )


def _apply(
    name: str,
    values: np.ndarray,
    rows: slice,
    j: int,
    load: np.ndarray,
    sensor: _Sensor,
    rng: np.random.Generator,
) -> None:
    length = rows.stop - rows.start
    scale = max(sensor.noise, abs(sensor.gain) * 0.5)
    sign = rng.choice([-1.0, 1.0])
    if name == "spike":
        values[rows, j] += sign * rng.uniform(6, 10) * scale
    elif name == "level_shift":
        values[rows, j] += sign * rng.uniform(3, 5) * scale
    elif name == "drift":
        values[rows, j] += sign * np.linspace(0.5, 6.0, length) * scale
    elif name == "stuck":
        values[rows, j] = values[rows.start - 1, j]
    elif name == "noise_burst":
        values[rows, j] += rng.normal(0.0, 4.0 * scale, length)
    elif name == "correlation_break":
        # The sensor stops following the shared load and moves against it.
        gain = sensor.gain if abs(sensor.gain) > 0 else scale
        values[rows, j] -= 2.0 * gain * load[rows]
        values[rows, j] += sign * 2.0 * scale
