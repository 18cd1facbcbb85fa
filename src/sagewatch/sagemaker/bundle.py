"""The source archive that carries sagewatch into the job containers.

The archive holds the ``sagewatch`` package's Python files, a ``requirements.txt``
(the runtime dependencies except PyTorch, which the framework image provides) and
the training program the ``sagemaker-training`` toolkit runs. It is built
deterministically: files in sorted order, zero timestamps and owners, gzip without
a name or time. The same source therefore gives the same bytes on every build, and
the archive is stored under a key named after its content
(``code/<sha256>/sourcedir.tar.gz``): uploading it again is a no-op, and a pipeline
definition that names it changes only when the code does, so step caching works.

Notes:
    The key is the SHA-256 of the *uncompressed* tar stream, so it does not depend
    on the zlib build; the compressed bytes are identical on one machine, and may
    differ across zlib versions without changing the key or the content.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import sagewatch
from sagewatch.sagemaker.contract import ENTRY_MODULE, SOURCE_ARCHIVE, TRAIN_PROGRAM

# Runtime dependencies installed in the container (pyproject's, less torch: the
# PyTorch framework image brings its own build, matched to its CUDA).
REQUIREMENTS = (
    "numpy>=1.26",
    "polars>=1.20",
    "pyarrow>=15",
    "scikit-learn>=1.4",
    "threadpoolctl>=3.1",
    "pydantic>=2.6",
    "pyyaml>=6",
    "click>=8.1",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "boto3>=1.34",
)

TRAIN_SCRIPT = f'''"""Training job program, run by the sagemaker-training toolkit."""

import sys

from {ENTRY_MODULE} import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
'''


@dataclass(frozen=True)
class SourceBundle:
    """A built archive: its gzip bytes, content hash and member names."""

    data: bytes
    sha256: str
    members: tuple[str, ...]

    @property
    def key(self) -> str:
        """The archive's key below the base prefix: ``code/<sha256[:16]>/...``."""
        return f"code/{self.sha256[:16]}/{SOURCE_ARCHIVE}"


def package_root() -> Path:
    """The folder of the imported ``sagewatch`` package."""
    return Path(sagewatch.__file__).resolve().parent


def build_source_bundle(root: Path | None = None) -> SourceBundle:
    """Pack the package at ``root`` (default: the imported one) with its extras."""
    root = package_root() if root is None else root
    files = {
        f"sagewatch/{path.relative_to(root).as_posix()}": path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and path.suffix in {".py", ".typed"}
        if "__pycache__" not in path.parts
    }
    files["requirements.txt"] = ("\n".join(REQUIREMENTS) + "\n").encode()
    files[TRAIN_PROGRAM] = TRAIN_SCRIPT.encode()
    tar_bytes = _tar(files)
    return SourceBundle(
        data=_gzip(tar_bytes),
        sha256=hashlib.sha256(tar_bytes).hexdigest(),
        members=tuple(sorted(files)),
    )


def _tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(files[name]))
    return buffer.getvalue()


def _gzip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz:
        gz.write(data)
    return buffer.getvalue()
