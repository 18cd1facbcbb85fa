"""Shared fixtures: small settings, the real data folder, logging quiet."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagewatch.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the caller's sagewatch variables or AWS endpoint."""
    from sagewatch.config import ENV_VARS

    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def small_settings() -> Settings:
    """Fast settings: 2 machines x 400 rows, 5 epochs."""
    return load_settings(
        ROOT / "config.yaml",
        environ={},
        overrides={"n_samples": 400, "n_machines": 2, "epochs": 5},
    )


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
