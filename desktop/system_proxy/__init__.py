"""The OS proxy settings: pointed at the agent while connected, the user's own put back after.

``base`` (the backend interface), one module per backend (``gsettings``, ``kde``,
``windows``, ``macos``), ``detect`` (which one this desktop uses, or what to set by hand),
``manager`` (the crash-safe save and restore) and ``follower`` (the controller observer the
tray and ``fluidity-agent`` subscribe).
"""

from desktop.system_proxy.base import Mode, ProxyRequest, SystemProxyError

__all__ = ["Mode", "ProxyRequest", "SystemProxyError"]
