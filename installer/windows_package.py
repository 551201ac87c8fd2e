"""The Windows installer: Inno Setup's compiler (ISCC) run on ``windows/fluidity.iss``.

Everything build-specific (version, bundle folder, icon, output folder) is passed as
preprocessor defines, so the script itself never changes between releases.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ISS_SCRIPT = Path(__file__).resolve().parent / "windows" / "fluidity.iss"
#: Where the Inno Setup 6 installer (or ``choco install innosetup``) puts the compiler.
_ISCC_LOCATIONS = (
    ("ProgramFiles(x86)", "Inno Setup 6"),
    ("ProgramFiles", "Inno Setup 6"),
    ("LOCALAPPDATA", "Programs/Inno Setup 6"),
)


def setup_file_name(version: str) -> str:
    """Must match ``OutputBaseFilename`` in the script."""
    return f"Fluidity-{version}-windows-setup.exe"


def iscc_defines(version: str, bundle: Path, icon: Path, out_dir: Path) -> dict[str, str]:
    return {
        "AppVersion": version,
        "SourceDir": str(bundle),
        "IconFile": str(icon),
        "OutputDir": str(out_dir),
    }


def iscc_command(iscc: str, defines: dict[str, str], script: Path = ISS_SCRIPT) -> list[str]:
    return [iscc, "/Q", *(f"/D{name}={value}" for name, value in defines.items()), str(script)]


def find_iscc() -> str | None:
    found = shutil.which("iscc") or shutil.which("ISCC")
    if found:
        return found
    for variable, folder in _ISCC_LOCATIONS:
        base = os.environ.get(variable)
        if base and (Path(base) / folder / "ISCC.exe").is_file():
            return str(Path(base) / folder / "ISCC.exe")
    return None


def build_installer(bundle: Path, icon: Path, out_dir: Path, version: str) -> Path:
    iscc = find_iscc()
    if iscc is None:
        raise FileNotFoundError(
            "Inno Setup's ISCC.exe was not found: install Inno Setup 6 (choco install innosetup)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(iscc_command(iscc, iscc_defines(version, bundle, icon, out_dir)), check=True)
    return out_dir / setup_file_name(version)
