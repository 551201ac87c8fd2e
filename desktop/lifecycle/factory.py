"""Pick the lifecycle backend named by the ``lifecycle`` setting.

Backends are imported only when chosen: boto3 (ecs) and the local server (local) are slow
to import and not needed by users of the other backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from desktop.config import ON_DEMAND_LIFECYCLES, AgentConfig
from desktop.lifecycle.base import LifecycleError, ServerLifecycle

if TYPE_CHECKING:
    from desktop.usage import UsageStore


def create_lifecycle(
    config: AgentConfig, *, usage: UsageStore | None = None, server_log: Path | None = None
) -> ServerLifecycle:
    """The backend for ``config.lifecycle``; raises LifecycleError for an unknown name.

    With ``usage``, a backend that starts a paid server (lambda, ecs) records its running time
    there. ``server_log`` is where the local backend's server writes its log (the tray's folder).
    """
    backend = _backend(config, server_log)
    if usage is not None and config.lifecycle in ON_DEMAND_LIFECYCLES:
        from desktop.lifecycle.metered import MeteredLifecycle

        return MeteredLifecycle(backend, usage)
    return backend


def _backend(config: AgentConfig, server_log: Path | None) -> ServerLifecycle:
    if config.lifecycle == "static":
        from desktop.lifecycle.static import StaticLifecycle

        return StaticLifecycle(config)
    if config.lifecycle == "local":
        from desktop.lifecycle.local import LocalLifecycle

        return LocalLifecycle(config, server_log=server_log)
    if config.lifecycle == "lambda":
        from desktop.lifecycle.lambda_api import LambdaLifecycle

        return LambdaLifecycle(config)
    if config.lifecycle == "ecs":
        from desktop.lifecycle.ecs import EcsLifecycle

        return EcsLifecycle(config)
    raise LifecycleError(
        "config", f"unknown lifecycle {config.lifecycle!r}; use static, local, lambda or ecs"
    )
