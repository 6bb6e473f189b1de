"""Logging set-up shared by the worker and the launcher, with the level names the scheduler accepts too."""

from __future__ import annotations

import logging

_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING}


def setup_logging(level: str) -> None:
    name = level.lower()
    value = _LEVELS.get(name) or logging.getLevelName(name.upper())
    logging.basicConfig(
        level=value if isinstance(value, int) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
