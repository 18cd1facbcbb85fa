"""The paths and names the job requests and the container entry points share.

Paths are written as SageMaker mounts them under ``/opt/ml``. Inside a container,
:func:`local` maps them under ``SAGEMAKER_BASE_DIR`` when it is set (the variable the
``sagemaker-training`` toolkit honours), so tests and local runs can use a temporary
``/opt/ml`` tree with the very same code.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE = "/opt/ml"
BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"

# Processing jobs: inputs and outputs sit wherever the request's LocalPaths say.
PROCESSING = f"{BASE}/processing"
CODE_INPUT = f"{PROCESSING}/input/code"
RAW_INPUT = f"{PROCESSING}/input/raw"
FEATURES_INPUT = f"{PROCESSING}/input/features"
MODEL_INPUT = f"{PROCESSING}/input/model"
SCORES_INPUT = f"{PROCESSING}/input/scores"
FEATURES_OUTPUT = f"{PROCESSING}/output/features"
SCORES_OUTPUT = f"{PROCESSING}/output/scores"
EVALUATION_OUTPUT = f"{PROCESSING}/output/evaluation"
PROCESSING_RESOURCE_CONFIG = f"{BASE}/config/resourceconfig.json"
# DescribeProcessingJob reports this file's first 1024 bytes as ExitMessage.
EXIT_MESSAGE_FILE = f"{BASE}/output/message"

# Training jobs: the toolkit's layout.
TRAIN_CHANNEL = "train"
TRAINING_INPUT = f"{BASE}/input/data/{TRAIN_CHANNEL}"
MODEL_DIR = f"{BASE}/model"
OUTPUT_DATA_DIR = f"{BASE}/output/data"
# DescribeTrainingJob reports this file's first 1024 bytes as FailureReason.
FAILURE_FILE = f"{BASE}/output/failure"
HYPERPARAMETERS_FILE = f"{BASE}/input/config/hyperparameters.json"
TRAINING_RESOURCE_CONFIG = f"{BASE}/input/config/resourceconfig.json"

# The source archive and what runs from it.
SOURCE_ARCHIVE = "sourcedir.tar.gz"
TRAIN_PROGRAM = "sagewatch_train.py"
ENTRY_MODULE = "sagewatch.sagemaker.entrypoints"
MODEL_ARCHIVE = "model.tar.gz"


def local(path: str) -> Path:
    """Where a contract path lives here: under ``SAGEMAKER_BASE_DIR`` when set."""
    base = os.environ.get(BASE_DIR_ENV)
    if not base or not path.startswith(BASE):
        return Path(path)
    return Path(base, path[len(BASE) :].lstrip("/"))
