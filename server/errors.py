"""The root of Fluidity's own exceptions.

Why one root: a caller that must tell "Fluidity said no, with a message meant for the
user" from a bug or a library's failure can catch ``FluidityError`` instead of listing
every module's error class. Each project error keeps its other bases (``ValueError``,
``ConnectionError``, ``OSError`` ...), so existing ``except`` clauses still match.

Standard library only: the Lambda bundle ships this module (``lambdas/packaging.py``).
"""

from __future__ import annotations


class FluidityError(Exception):
    """An error Fluidity raises on purpose; its message says what went wrong and what to do."""
