"""The exceptions sagewatch raises, as one tree.

::

    SagewatchError                 anything this package raises on purpose
    ├── ConfigError                unknown key, wrong type, conflicting options
    ├── InputError                 input data that breaks the schema contract
    │   └── SchemaMismatchError    scoring columns differ from the model's
    ├── StorageError               a URI that cannot be read or written
    │   ├── NotFoundError          missing file, bucket, key or empty prefix
    │   ├── AccessDeniedError      credentials lack permission
    │   └── EndpointError          the S3 endpoint cannot be reached
    ├── ArtifactError              a detector artifact that is missing, tampered
    │                              or from an incompatible version
    ├── NotFittedError             a detector used before ``fit``
    └── CloudError                 a SageMaker request failed or a job failed

Every foreign error (botocore, polars, torch) is wrapped once into one of these and
chained, so callers catch ``SagewatchError`` and the CLI turns it into one line and a
non-zero exit.
"""

from __future__ import annotations


class SagewatchError(Exception):
    """Base class of every error sagewatch raises on purpose."""

    exit_code = 1


class ConfigError(SagewatchError):
    """A setting is unknown, has the wrong type, or conflicts with another."""

    exit_code = 2


class InputError(SagewatchError):
    """Input data violates the schema contract (names file, column, row)."""

    exit_code = 3


class SchemaMismatchError(InputError):
    """Data given for scoring does not have the sensors the model was trained on."""


class StorageError(SagewatchError):
    """A URI could not be read or written."""

    exit_code = 4


class NotFoundError(StorageError):
    """A file, bucket, key or prefix does not exist or holds nothing."""


class AccessDeniedError(StorageError):
    """The credentials in use may not read or write the URI."""


class EndpointError(StorageError):
    """The storage endpoint could not be reached."""


class ArtifactError(SagewatchError):
    """A detector artifact is missing, damaged, or from an incompatible version."""

    exit_code = 5


class NotFittedError(SagewatchError):
    """A detector was asked to score before it was fitted."""


class CloudError(SagewatchError):
    """A SageMaker request was refused or a job ended in failure."""

    exit_code = 6
