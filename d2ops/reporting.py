"""Where results are reported, kept apart from how they are computed.

Library functions take a :class:`Reporter` and call it; they never import ClearML. The base
class is a no-op, so the library runs (and is tested) with no tracking at all; the ClearML
implementation lives in :mod:`d2ops.clearml.step`. Call order inside a step is free.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RecordingReporter", "Reporter"]

log = logging.getLogger(__name__)


class Reporter:
    """Sink for a step's metrics, plots, images, artifacts and configuration. Every method is a no-op."""

    def scalar(self, title: str, series: str, value: float, iteration: int) -> None:
        """A point of a time series (losses, lr, periodic AP)."""

    def single_value(self, name: str, value: float) -> None:
        """A headline number (final AP50, F2)."""

    def curve(
        self,
        title: str,
        series: str,
        xs: Sequence[float],
        ys: Sequence[float],
        *,
        xlabel: str = "",
        ylabel: str = "",
    ) -> None:
        """A 2-D line plot, e.g. one class's precision/recall curve."""

    def confusion_matrix(self, title: str, matrix: np.ndarray, labels: Sequence[str]) -> None:
        """A square matrix of counts, rows = ground truth, columns = prediction."""

    def image(self, title: str, series: str, image: np.ndarray, iteration: int = 0) -> None:
        """An RGB uint8 image (HWC)."""

    def artifact(self, name: str, obj: Path | dict[str, Any]) -> None:
        """A file or JSON-able dict attached to the step's record."""

    def configuration(self, name: str, text: str, description: str = "") -> None:
        """A configuration object (e.g. the merged detectron2 config as YAML)."""


class RecordingReporter(Reporter):
    """Keeps everything in memory; handy in notebooks and for inspecting a step's output."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, str, float, int]] = []
        self.values: dict[str, float] = {}
        self.curves: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        self.matrices: dict[str, tuple[np.ndarray, list[str]]] = {}
        self.images: list[tuple[str, str, tuple[int, ...]]] = []
        self.artifacts: dict[str, Path | dict[str, Any]] = {}
        self.configurations: dict[str, str] = {}

    def scalar(self, title: str, series: str, value: float, iteration: int) -> None:
        self.scalars.append((title, series, float(value), int(iteration)))

    def single_value(self, name: str, value: float) -> None:
        self.values[name] = float(value)

    def curve(
        self,
        title: str,
        series: str,
        xs: Sequence[float],
        ys: Sequence[float],
        *,
        xlabel: str = "",
        ylabel: str = "",
    ) -> None:
        self.curves[(title, series)] = (list(xs), list(ys))

    def confusion_matrix(self, title: str, matrix: np.ndarray, labels: Sequence[str]) -> None:
        self.matrices[title] = (matrix, list(labels))

    def image(self, title: str, series: str, image: np.ndarray, iteration: int = 0) -> None:
        self.images.append((title, series, tuple(image.shape)))

    def artifact(self, name: str, obj: Path | dict[str, Any]) -> None:
        self.artifacts[name] = obj

    def configuration(self, name: str, text: str, description: str = "") -> None:
        self.configurations[name] = text
