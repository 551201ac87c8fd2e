"""The Lambda deployment zip: exactly the code the handlers import, built byte-for-byte reproducibly.

Reproducible bytes mean the same source gives the same SHA-256, so the S3 key (which carries
the hash) only changes when the code does, and CloudFormation only updates the functions then.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from server.errors import FluidityError

#: Timestamp written for every entry (the earliest a zip can hold), so builds do not depend on mtimes.
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
#: rw-r--r-- regular file; Lambda only needs to read the code.
FILE_MODE = 0o100644
#: The stdlib-only ``server`` modules the handlers import: the shared protocol (replies, metric
#: names), the one duration parser, the one JSON log formatter and the exception root they
#: need. The rest of ``server`` is not needed (and pulls in third-party packages).
SERVER_MODULES = (
    "server/__init__.py",
    "server/durations.py",
    "server/errors.py",
    "server/framing.py",
    "server/json_logging.py",
)
#: Modules of ``lambdas`` that run on a deployer's or developer's machine, never inside a Lambda:
#: the deploy tool, this packager and the local API gateway (a listening HTTP server that has
#: no business in a function behind the real API Gateway).
DEPLOY_TOOLING = frozenset({"deploy.py", "packaging.py", "local_gateway.py"})


class PackagingError(FluidityError):
    """The source tree does not hold the files the Lambda bundle needs."""


@dataclass(frozen=True)
class LambdaBundle:
    """A built zip and its content hash (hex SHA-256 of the zip bytes)."""

    data: bytes
    sha256: str
    members: tuple[str, ...]

    @property
    def s3_key(self) -> str:
        """Content-addressed key: new code gets a new key, unchanged code keeps its key."""
        return f"lambdas/fluidity-lambdas-{self.sha256[:16]}.zip"


def project_root() -> Path:
    """The folder holding ``lambdas/`` and ``server/`` (works from a checkout or an install)."""
    return Path(__file__).resolve().parent.parent


def bundle_members(root: Path) -> list[str]:
    """Archive names, sorted: ``lambdas/*.py`` (minus DEPLOY_TOOLING) and the SERVER_MODULES."""
    lambdas_dir = root / "lambdas"
    if not (lambdas_dir / "handlers.py").is_file():
        raise PackagingError(f"{lambdas_dir / 'handlers.py'} is missing: nothing to deploy as the Lambdas")
    members = [
        f"lambdas/{path.name}"
        for path in lambdas_dir.glob("*.py")
        if path.is_file() and path.name not in DEPLOY_TOOLING
    ]
    for name in SERVER_MODULES:
        if not (root / name).is_file():
            raise PackagingError(f"{root / name} is missing: the Lambda handlers import it")
        members.append(name)
    return sorted(members)


def build_bundle(root: Path | None = None) -> LambdaBundle:
    """Zip the Lambda code under ``root`` with fixed timestamps and modes, in sorted order."""
    base = project_root() if root is None else root
    members = bundle_members(base)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in members:
            info = zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = FILE_MODE << 16
            info.create_system = 3  # Unix, so the mode bits above are honoured
            archive.writestr(info, (base / name).read_bytes(), compresslevel=9)
    data = buffer.getvalue()
    return LambdaBundle(data=data, sha256=hashlib.sha256(data).hexdigest(), members=tuple(members))
