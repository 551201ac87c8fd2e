"""The macOS disk image: sign Fluidity.app, wrap it in a .dmg, notarize and staple.

Signing runs only when the signing secrets are in the environment (CI passes them from the
repository's secrets) and notarization only when the Apple ID secrets are too; otherwise
the step says it is skipped and the unsigned .dmg is still built, so a developer without a
certificate gets the same artifact layout.
"""

from __future__ import annotations

import base64
import os
import platform
import secrets
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bundle_contents import APP_NAME

#: base64 of the "Developer ID Application" certificate + key (.p12) and its password.
SIGNING_SECRETS = ("MACOS_CERT_P12", "MACOS_CERT_PASSWORD")
#: Apple ID, team and app-specific password for ``notarytool``.
NOTARY_SECRETS = ("APPLE_ID", "APPLE_TEAM_ID", "APPLE_APP_PASSWORD")
#: codesign picks the one certificate whose name contains this.
DEFAULT_IDENTITY = "Developer ID Application"
ENTITLEMENTS = Path(__file__).resolve().parent / "macos" / "entitlements.plist"


def dmg_file_name(version: str, machine: str | None = None) -> str:
    """``Fluidity-<version>-macos-<arm64|x86_64>.dmg``: PyInstaller builds for the build Mac's CPU."""
    return f"{APP_NAME}-{version}-macos-{machine or platform.machine()}.dmg"


def _present(env: Mapping[str, str], names: tuple[str, ...]) -> bool:
    return all(env.get(name) for name in names)


@dataclass
class ReleasePlan:
    """The commands that turn the .app into a distributable .dmg, and what is skipped and why."""

    commands: list[list[str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    signs: bool = False
    notarizes: bool = False


def keychain_commands(
    keychain: Path, keychain_password: str, p12: Path, p12_password: str
) -> list[list[str]]:
    """A throwaway keychain holding the certificate, searchable by codesign without a prompt."""
    return [
        ["security", "create-keychain", "-p", keychain_password, str(keychain)],
        ["security", "set-keychain-settings", "-lut", "3600", str(keychain)],
        ["security", "unlock-keychain", "-p", keychain_password, str(keychain)],
        ["security", "import", str(p12), "-k", str(keychain), "-P", p12_password, "-T", "/usr/bin/codesign"],
        [
            "security",
            "set-key-partition-list",
            "-S",
            "apple-tool:,apple:",
            "-s",
            "-k",
            keychain_password,
            str(keychain),
        ],  # fmt: skip
        ["security", "list-keychains", "-d", "user", "-s", str(keychain), "login.keychain"],
    ]


def plan_release(app: Path, dmg: Path, staging: Path, keychain: Path, env: Mapping[str, str]) -> ReleasePlan:
    """Sign (if the secrets are set), build the .dmg, sign it, notarize and staple (if set)."""
    plan = ReleasePlan()
    identity = env.get("MACOS_SIGN_IDENTITY") or DEFAULT_IDENTITY
    keychain_args = ["--keychain", str(keychain)]
    plan.signs = _present(env, SIGNING_SECRETS)
    if plan.signs:
        plan.commands.append(
            [
                "codesign",
                "--force",
                "--deep",
                "--options",
                "runtime",
                "--timestamp",
                "--entitlements",
                str(ENTITLEMENTS),
                *keychain_args,
                "--sign",
                identity,
                str(app),
            ]  # fmt: skip
        )
        plan.commands.append(["codesign", "--verify", "--deep", "--strict", "--verbose=2", str(app)])
    else:
        plan.skipped.append(f"skipping signing: {' and '.join(SIGNING_SECRETS)} are not set")
    plan.commands.append(
        [
            "hdiutil",
            "create",
            "-volname",
            APP_NAME,
            "-srcfolder",
            str(staging),
            "-ov",
            "-format",
            "UDZO",
            str(dmg),
        ]  # fmt: skip
    )
    if plan.signs:
        plan.commands.append(["codesign", "--timestamp", *keychain_args, "--sign", identity, str(dmg)])
    plan.notarizes = plan.signs and _present(env, NOTARY_SECRETS)
    if plan.notarizes:
        plan.commands.append(
            [
                "xcrun",
                "notarytool",
                "submit",
                str(dmg),
                "--apple-id",
                env["APPLE_ID"],
                "--team-id",
                env["APPLE_TEAM_ID"],
                "--password",
                env["APPLE_APP_PASSWORD"],
                "--wait",
            ]  # fmt: skip
        )
        plan.commands.append(["xcrun", "stapler", "staple", str(dmg)])
    elif plan.signs:
        plan.skipped.append(f"skipping notarization: {', '.join(NOTARY_SECRETS)} are not all set")
    else:
        plan.skipped.append("skipping notarization: the app is not signed")
    return plan


def _stage(app: Path, staging: Path) -> None:
    """The .dmg's contents: the app and a link to /Applications to drag it onto."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    shutil.copytree(app, staging / app.name, symlinks=True)
    (staging / "Applications").symlink_to("/Applications")


def _import_certificate(env: Mapping[str, str], keychain: Path, work: Path) -> None:
    p12 = work / "signing.p12"
    p12.write_bytes(base64.b64decode(env["MACOS_CERT_P12"]))
    try:
        for command in keychain_commands(
            keychain, secrets.token_urlsafe(24), p12, env["MACOS_CERT_PASSWORD"]
        ):
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    finally:
        p12.unlink()


def build_dmg(
    app: Path, out_dir: Path, work: Path, version: str, env: Mapping[str, str] = os.environ
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    dmg = out_dir / dmg_file_name(version)
    staging = work / "dmg"
    keychain = work / "signing.keychain-db"
    plan = plan_release(staging / app.name, dmg, staging, keychain, env)
    for reason in plan.skipped:
        print(reason, flush=True)
    # The copy that goes into the image is signed, so the bundle PyInstaller made stays as it was.
    _stage(app, staging)
    try:
        if plan.signs:
            _import_certificate(env, keychain, work)
        for command in plan.commands:
            print(f"+ {command[0]} {command[1]}", flush=True)  # later arguments may hold secrets
            subprocess.run(command, check=True)
    finally:
        if plan.signs and keychain.exists():
            subprocess.run(["security", "delete-keychain", str(keychain)], check=False)
    return dmg
