"""``fluidity doctor``: read-only checks that say what is wrong with a Fluidity set-up and how to fix it.

The checks run in order (settings, certificates, the local proxy port, the control plane,
the AWS deployment, the server itself), each printing one PASS / WARN / FAIL line with what
it found and, for a problem, the fix. ``fluidity-agent --doctor`` and the tray's
"Diagnose…" item run the same checks.
"""

from desktop.doctor.model import CheckResult, Report, Status, render_text
from desktop.doctor.runner import DoctorOptions, diagnose, main, run_doctor

__all__ = [
    "CheckResult",
    "DoctorOptions",
    "Report",
    "Status",
    "diagnose",
    "main",
    "render_text",
    "run_doctor",
]
