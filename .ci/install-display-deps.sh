#!/usr/bin/env bash
# Installs what the desktop tests need: a virtual X display, a tray host, a D-Bus session
# with a notification daemon, screenshot/click tools and PyGObject for pystray's gtk
# backend; GSettings on dconf and KDE's kwriteconfig5 for the system proxy backends; node
# to run the generated PAC file; headless Chromium for the proxy's browser tests.
# Safe to run repeatedly; prints only on failure.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV_PYTHON="${VENV_PYTHON:-.venv/bin/python}"

APT_PACKAGES=(
  xvfb trayer x11-utils xdotool imagemagick dbus-x11 dunst desktop-file-utils curl
  libgirepository1.0-dev libcairo2-dev pkg-config gir1.2-gtk-3.0 gir1.2-ayatanaappindicator3-0.1
  dbus libglib2.0-bin dconf-gsettings-backend dconf-service gsettings-desktop-schemas libkf5config-bin
  chromium
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# Any node will do for evaluating the PAC file; Debian's only when there is none.
command -v node >/dev/null || missing+=(nodejs)

if [ "${#missing[@]}" -gt 0 ]; then
  if ! { $SUDO apt-get update -qq && \
         DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
       >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-display-deps: apt-get failed for: ${missing[*]}" >&2
    exit 1
  fi
fi

# PyGObject >= 3.52 needs girepository-2.0 (glib 2.80); Debian 12 ships glib 2.74.
if ! "$VENV_PYTHON" -c "import gi" >/dev/null 2>&1; then
  if ! "$VENV_PYTHON" -m pip install -q "PyGObject<3.51" >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-display-deps: pip install PyGObject failed" >&2
    exit 1
  fi
fi
