"""Keeping credentials out of what ClearML records about a task.

d2ops never puts credentials into parameters, configs or docker arguments (the config schema
rejects them). One record it does not write itself can still carry them: the uncommitted
``git diff`` that ClearML stores with every task. :func:`scrub_recorded_diff` removes every line
holding a credential this process can know of before the task is kept.
"""

from __future__ import annotations

import logging
from typing import Any

from d2ops.secrets import known_secret_values, redact

__all__ = ["scrub_recorded_diff"]

log = logging.getLogger(__name__)


def scrub_recorded_diff(task: Any, timeout_s: float = 30.0) -> int:
    """Remove credential values from the uncommitted ``git diff`` ClearML records with a task.

    ClearML detects the repository in a background thread; this waits for it (bounded), then
    rewrites the diff if any line holds a credential the process can see. Returns the number of
    lines removed. An agent cannot apply such a diff: commit or stash the file instead.
    """
    try:
        # clearml 2.1.12: no public way to wait for the background repository detection.
        task._wait_for_repo_detection(timeout=timeout_s)
        diff = str(getattr(task.data.script, "diff", "") or "")
    except Exception:  # no repository detected: nothing recorded, nothing to scrub
        log.debug("no script diff to check", exc_info=True)
        return 0
    clean, removed = redact(diff, known_secret_values())
    if removed:
        task.set_script(diff=clean)
        log.warning(
            "removed %d line(s) holding credentials from the uncommitted git diff recorded with task %s; "
            "commit or stash the file that holds them, and keep credentials in the environment or clearml.conf",
            removed,
            task.id,
        )
    return removed
