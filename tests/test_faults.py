"""A run killed part-way (SIGKILL) leaves no half-written output under a final name.

Each case runs the pipeline in a child process that kills itself at a chosen point,
checks every file left under its final name is whole, then re-runs in the same folder
and compares the scores with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest

import sagewatch
from sagewatch.config import Settings
from sagewatch.pipeline import run

OVERRIDES = {
    "n_samples": 120,
    "n_machines": 2,
    "rolling_window": 6,
    "epochs": 4,
    "patience": 10,
    "hidden_dims": [8],
    "encoding_dim": 2,
    "batch_size": 64,
}

# Each kill point patches one function in the child, then runs the pipeline.
KILLERS = {
    # The second feature part is fully written to its temporary name; die before
    # it is moved into place.
    "features-before-rename": """
        import os
        real = os.replace
        def replace(src, dst):
            if os.path.basename(dst) == "features-machine_002.parquet":
                die()
            return real(src, dst)
        os.replace = replace
    """,
    # Die in the middle of the second training epoch.
    "training": """
        from sagewatch import training
        real = training._epoch
        calls = []
        def epoch(*args):
            calls.append(1)
            if len(calls) == 2:
                die()
            return real(*args)
        training._epoch = epoch
    """,
    # Write half of the scores CSV to its temporary name, then die.
    "scores-mid-write": """
        import polars as pl
        real = pl.DataFrame.write_csv
        def write_csv(self, target=None, *args, **kwargs):
            if "anomaly_scores.csv" not in str(target):
                return real(self, target, *args, **kwargs)
            text = real(self)
            with open(target, "w") as fh:
                fh.write(text[: len(text) // 2])
                fh.flush()
            die()
        pl.DataFrame.write_csv = write_csv
    """,
}

CHILD = """
import os, signal, sys
from sagewatch.config import Settings
from sagewatch.pipeline import run

def die():
    os.kill(os.getpid(), signal.SIGKILL)

{killer}
run(Settings().with_overrides({overrides!r}), data_dir=sys.argv[1])
"""


def _settings() -> Settings:
    return Settings().with_overrides(OVERRIDES)


@pytest.fixture(scope="module")
def clean_scores(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    data_dir = tmp_path_factory.mktemp("clean")
    run(_settings(), data_dir=str(data_dir))
    return (data_dir / "scores" / "anomaly_scores.csv").read_bytes()


def _run_killed(data_dir: Path, killer: str) -> subprocess.CompletedProcess:
    script = CHILD.format(killer=textwrap.dedent(killer), overrides=OVERRIDES)
    src = str(Path(sagewatch.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", script, str(data_dir)],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )


def _final_files(data_dir: Path) -> list[Path]:
    return [
        p
        for p in data_dir.rglob("*")
        if p.is_file() and not p.name.startswith(".") and ".tmp-" not in p.name
    ]


def _assert_whole(path: Path) -> None:
    """Every file under a final name parses completely."""
    if path.suffix == ".parquet":
        pl.read_parquet(path)
    elif path.suffix == ".csv":
        frame = pl.read_csv(path)
        assert frame.height > 0
        assert path.read_bytes().endswith(b"\n")
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".html":
        assert path.read_text().rstrip().endswith("</html>")
    elif path.name == "weights.pt":
        import torch

        torch.load(path, weights_only=True)


@pytest.mark.parametrize("point", list(KILLERS))
def test_killed_run_leaves_whole_files_and_rerun_matches(
    point: str, tmp_path: Path, clean_scores: bytes
) -> None:
    rewrite = point == "scores-mid-write"
    if rewrite:  # a complete earlier run: its scores must survive the crash
        run(_settings(), data_dir=str(tmp_path))
    child = _run_killed(tmp_path, KILLERS[point])
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]

    left = _final_files(tmp_path)
    for path in left:
        _assert_whole(path)
    names = {p.name for p in left}
    temporary = [p.name for p in tmp_path.rglob(".*.tmp-*")]
    if point == "features-before-rename":
        assert "features-machine_001.parquet" in names
        assert "features-machine_002.parquet" not in names
        assert len(temporary) == 1 and "features-machine_002" in temporary[0]
    if point == "training":
        assert "features-machine_002.parquet" in names
        assert "weights.pt" not in names
    if rewrite:
        # Both copies wait under temporary names until both are finished: the
        # Parquet one whole, the CSV one half-written when the process died.
        assert sorted(t.split(".tmp-")[0] for t in temporary) == [
            ".anomaly_scores.csv",
            ".anomaly_scores.parquet",
        ]
        scores = tmp_path / "scores" / "anomaly_scores.csv"
        assert scores.read_bytes() == clean_scores
    else:
        assert "anomaly_scores.csv" not in names
        assert "run_manifest.json" not in names

    run(_settings(), data_dir=str(tmp_path))
    assert (tmp_path / "scores" / "anomaly_scores.csv").read_bytes() == clean_scores
