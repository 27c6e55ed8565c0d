"""Keeping credentials out of what ClearML records.

d2ops never puts credentials into parameters, configs or docker arguments (the config schema
rejects them). One record it does not write itself can still carry them: the uncommitted
``git diff`` that ClearML stores with every task, so that a local edit of a tracked file holding
a key would be uploaded with the experiment. :func:`redact` removes such lines before the task
is kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["SECRET_ENV", "known_secret_values", "redact"]

#: Environment variables whose values are credentials.
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "CLEARML_API_ACCESS_KEY",
    "CLEARML_API_SECRET_KEY",
    "MINIO_ROOT_PASSWORD",
    "D2OPS_SERVE_TOKEN",
)
_MIN_SECRET_LEN = 6  # shorter values would redact ordinary text
_REDACTED = "[d2ops: line removed from the recorded diff: it looked like a credential]"


def known_secret_values() -> set[str]:
    """Credential values this process can see: the environment and clearml.conf's S3 entries."""
    values = {os.environ.get(name, "") for name in SECRET_ENV}
    from d2ops.storage import _clearml_credentials

    for entry in _clearml_credentials():
        values.update(str(entry.get(field) or "") for field in ("key", "secret", "token"))
    return {value for value in values if len(value) >= _MIN_SECRET_LEN}


def redact(text: str, values: Iterable[str] = ()) -> tuple[str, int]:
    """``text`` with every line that holds one of ``values`` replaced, and how many there were.

    Only known values are matched: a pattern ("secret = ...") would also remove ordinary code
    lines, and a diff an agent applies to reproduce the run must stay intact where it can.
    """
    values = [value for value in values if value]
    out, removed = [], 0
    for line in text.splitlines(keepends=True):
        if any(value in line for value in values):
            prefix = line[:1] if line[:1] in "+- " else ""
            out.append(f"{prefix}{_REDACTED}\n")
            removed += 1
        else:
            out.append(line)
    return "".join(out), removed
