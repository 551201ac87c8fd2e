"""Hand things to the desktop: open a file or folder, copy text, let the user pick a file.

A tray icon has no window of its own, so these go through whatever the platform offers
(xdg-open/open/startfile, xclip/wl-copy/pbcopy/clip, zenity/kdialog/osascript or a tkinter
dialog in a child process) without adding dependencies. Every function reports failure
instead of raising, so a missing tool becomes a notification, not a crash; only
``run_tool``, for settings tools whose failure the caller must act on, raises.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from desktop.launch import command_for
from server.errors import FluidityError

log = logging.getLogger("fluidity.shell")

#: Bound for external programs that should return at once (clipboard tools).
QUICK_TIMEOUT = 5.0
#: Bound for a file chooser the user is looking at.
CHOOSER_TIMEOUT = 600.0
#: Hidden ``fluidity`` flag that shows a tkinter file dialog and prints the choice.
CHOOSE_FILE_FLAG = "--choose-file"


#: How long an opener gets to fail before its silence counts as success (xdg-open returns
#: once the application is started, or stays while a terminal program shows the file).
OPENER_CHECK = 3.0
#: xdg-open's documented exit codes.
_XDG_OPEN_CODES = {
    1: "bad command line",
    2: "the file does not exist",
    3: "no application is set up to open it (a required tool was not found)",
    4: "the application failed to open it",
}


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Wait for an opener that outlived the check, so it does not linger as a zombie."""
    try:
        process.communicate()
    except Exception:  # the pipe may already be closed; the wait is what matters
        process.wait()


def open_path(path: Path, *, check_for: float = OPENER_CHECK) -> str | None:
    """Open ``path`` with the user's default application; None on success, else why not.

    Blocks up to ``check_for`` seconds to see whether the opener fails, so call it off the
    UI thread; an opener still running after that is waited for on a daemon thread.
    """
    try:
        if sys.platform == "win32":
            os.startfile(path)  # type: ignore[attr-defined]  # Windows only
            return None
        opener = "open" if sys.platform == "darwin" else shutil.which("xdg-open")
        if opener is None:
            return f"no xdg-open to open {path} (install xdg-utils)"
        process = subprocess.Popen(
            [opener, str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as error:
        return f"cannot open {path}: {error}"
    try:
        _out, err = process.communicate(timeout=check_for)
    except subprocess.TimeoutExpired:
        threading.Thread(target=_reap, args=(process,), name="opener-reaper", daemon=True).start()
        return None
    if process.returncode == 0:
        return None
    name = Path(opener).name
    said = " ".join(err.decode("utf-8", "replace").split())[:200]
    why = _XDG_OPEN_CODES.get(process.returncode, "") if name == "xdg-open" else ""
    detail = "; ".join(part for part in (why, said) if part)
    return f"{name} could not open {path} (exit code {process.returncode}{': ' + detail if detail else ''})"


class ToolFailed(FluidityError):
    """A command-line tool could not run or exited non-zero; the message names it and says why."""


def run_tool(
    argv: Sequence[str], *, timeout: float = QUICK_TIMEOUT, env: Mapping[str, str] | None = None
) -> str:
    """Run a settings tool (gsettings, kwriteconfig5, networksetup...) and return its output."""
    try:
        completed = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ToolFailed(f"{argv[0]} failed: {error}") from None
    if completed.returncode != 0:
        why = completed.stderr.strip() or completed.stdout.strip() or "no output"
        raise ToolFailed(f"{' '.join(argv[:2])} exited with {completed.returncode}: {why}")
    return completed.stdout


def _clipboard_commands() -> list[list[str]]:
    if sys.platform == "win32":
        return [["clip"]]
    if sys.platform == "darwin":
        return [["pbcopy"]]
    commands = []
    if os.environ.get("WAYLAND_DISPLAY"):
        commands.append(["wl-copy"])
    commands += [["xclip", "-selection", "clipboard"], ["xsel", "--clipboard", "--input"]]
    return [command for command in commands if shutil.which(command[0])]


def _copy_with_gtk(text: str) -> bool:
    """Use GTK's clipboard when the tray already runs a GTK main loop (gtk/appindicator backends)."""
    if "gi.repository.Gtk" not in sys.modules:
        return False
    from gi.repository import Gdk, GLib, Gtk

    def put() -> bool:
        clipboard = Gtk.Clipboard.get(Gdk.SELECTION_CLIPBOARD)
        clipboard.set_text(text, -1)
        clipboard.store()
        return False

    GLib.idle_add(put)
    return True


def copy_text(text: str) -> bool:
    """Put ``text`` on the clipboard; False when no clipboard tool is available."""
    for command in _clipboard_commands():
        try:
            # xclip/xsel fork a child that serves the selection; their stdout must not be a pipe
            # we wait on, or we would wait until the selection changes hands.
            completed = subprocess.run(
                command,
                input=text.encode("utf-16-le" if command == ["clip"] else "utf-8"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=QUICK_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            log.warning("clipboard tool failed", extra={"tool": command[0], "error": str(error)})
            continue
        if completed.returncode == 0:
            return True
    return _copy_with_gtk(text)


def _chooser_commands(title: str) -> list[list[str]]:
    if sys.platform == "darwin":
        script = f'POSIX path of (choose file with prompt "{title}")'
        return [["osascript", "-e", script]]
    if sys.platform == "win32":
        return []
    commands = []
    if shutil.which("zenity"):
        commands.append(["zenity", "--file-selection", f"--title={title}"])
    if shutil.which("kdialog"):
        commands.append(["kdialog", "--title", title, "--getopenfilename", str(Path.home())])
    return commands


def choose_file(title: str) -> Path | None:
    """Ask the user for a file; None if they cancelled or no dialog could be shown."""
    # The tkinter fallback runs in a child process: Tk must own the main thread of its
    # process, which in the tray belongs to the icon's event loop.
    for command in [*_chooser_commands(title), [*command_for("fluidity"), CHOOSE_FILE_FLAG, title]]:
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=CHOOSER_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            log.warning("file chooser failed", extra={"tool": command[0], "error": str(error)})
            continue
        choice = completed.stdout.strip()
        if completed.returncode == 0 and choice:
            return Path(choice)
        if completed.returncode == 1:
            return None  # every chooser here exits 1 when the user cancels
    return None


def run_tk_file_dialog(title: str) -> int:
    """Body of ``fluidity --choose-file``: show a native-looking dialog, print the choice."""
    try:
        import tkinter
        from tkinter import filedialog
    except ImportError:
        print("tkinter is not available", file=sys.stderr)
        return 2
    try:
        root = tkinter.Tk()
    except tkinter.TclError as error:
        print(f"cannot open a dialog: {error}", file=sys.stderr)
        return 2
    root.withdraw()
    choice = filedialog.askopenfilename(
        title=title, filetypes=[("Certificate bundle", "*.zip *.crt *.pem *.key"), ("All files", "*")]
    )
    root.destroy()
    if not choice:
        return 1
    print(choice)
    return 0


#: Signature of the three shell actions, so the tray can take replacements (tests, other UIs).
Opener = Callable[[Path], "str | None"]
Copier = Callable[[str], bool]
Chooser = Callable[[str], "Path | None"]
