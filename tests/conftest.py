"""Shared fixtures: one real offline pipeline run (slow, session-scoped) that many tests inspect."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE_CONFIG = str(REPO / "configs" / "smoke.yaml")


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    """Remove what a module- or session-scoped fixture made with ``tmp_path_factory`` when it is torn down.

    pytest keeps every ``mktemp`` directory to the end of the session, and the suite's trained models,
    checkpoints and exports come to about 14 GB if nothing is removed, enough to fill a CI disk
    (a checkpoint write failing mid-file). Per-test ``tmp_path`` directories are removed by
    ``tmp_path_retention_policy = "failed"`` in pyproject.toml; this does the same for shared fixtures
    when their scope ends. A directory is found as what appeared in the base temp during the setup.
    """
    if fixturedef.scope == "function" or fixturedef.argname == "tmp_path_factory":
        return (yield)
    base = request.getfixturevalue("tmp_path_factory").getbasetemp()
    before = set(base.iterdir())
    result = yield
    made = set(base.iterdir()) - before

    def remove() -> None:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)

    if made:
        fixturedef.addfinalizer(remove)
    return result


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Generate a dataset, serve it from a real local S3 endpoint and run the offline pipeline.

    This is the code path of ``make demo`` with the smoke config: moto's S3 server on 127.0.0.1,
    real detectron2 training on the CPU, one ClearML offline session per step.
    """
    from d2ops.cli.demo import run_demo

    out = tmp_path_factory.mktemp("pipeline")
    previous = os.environ.get("CLEARML_CACHE_DIR")
    summary = run_demo(out, SMOKE_CONFIG)
    yield {"out": out, "summary": summary, "summary_file": json.loads((out / "summary.json").read_text())}
    if previous is None:
        os.environ.pop("CLEARML_CACHE_DIR", None)
    else:
        os.environ["CLEARML_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, loadable model bundle with seeded random weights (see d2ops.testing)."""
    from d2ops.testing import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle"))
