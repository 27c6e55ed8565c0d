"""The one logging set-up of every d2ops process: commands, step workers and the local S3 endpoint."""

from __future__ import annotations

import logging

__all__ = ["FORMAT", "setup_logging"]

#: Time, level, logger, message: what a command, an agent's console and a step worker print.
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO, fmt: str = FORMAT) -> None:
    """Configure the root logger once per process (a no-op when something already configured it)."""
    logging.basicConfig(level=level, format=fmt)
