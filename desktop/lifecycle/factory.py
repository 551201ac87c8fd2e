"""Pick the lifecycle backend named by the ``lifecycle`` setting.

Backends are imported only when chosen: boto3 (ecs) and the local server (local) are slow
to import and not needed by users of the other backends.
"""

from __future__ import annotations

from desktop.config import AgentConfig
from desktop.lifecycle.base import LifecycleError, ServerLifecycle


def create_lifecycle(config: AgentConfig) -> ServerLifecycle:
    """The backend for ``config.lifecycle``; raises LifecycleError for an unknown name."""
    if config.lifecycle == "static":
        from desktop.lifecycle.static import StaticLifecycle

        return StaticLifecycle(config)
    if config.lifecycle == "local":
        from desktop.lifecycle.local import LocalLifecycle

        return LocalLifecycle(config)
    if config.lifecycle == "lambda":
        from desktop.lifecycle.lambda_api import LambdaLifecycle

        return LambdaLifecycle(config)
    if config.lifecycle == "ecs":
        from desktop.lifecycle.ecs import EcsLifecycle

        return EcsLifecycle(config)
    raise LifecycleError(
        "config", f"unknown lifecycle {config.lifecycle!r}; use static, local, lambda or ecs"
    )
