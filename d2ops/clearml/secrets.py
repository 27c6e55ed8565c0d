"""Keeping credentials out of what ClearML records about a task.

d2ops never puts credentials into parameters, configs or docker arguments (the config schema
rejects them, by the one rule of :mod:`d2ops.config_secrets`, which also says here which names hold
credentials). One record it does not write itself can still carry them: the uncommitted
``git diff`` that ClearML stores with every task, so that a local edit of a tracked file holding
a key would be uploaded with the experiment. :func:`redact` removes such lines before the task
is kept (:func:`scrub_recorded_diff`); :func:`known_secret_values` is every credential value this
process can know of.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from clearml.config import config_obj

from d2ops.config_secrets import CREDENTIAL_FILE_ENV, SECRET_ENV, is_secret_name, uri_userinfo

__all__ = [
    "CREDENTIAL_FILE_ENV",
    "SECRET_ENV",
    "is_secret_name",
    "known_secret_values",
    "redact",
    "scrub_recorded_diff",
]

log = logging.getLogger(__name__)

#: clearml.conf keys that name a credentials file (sdk.google.storage[.credentials[]].credentials_json).
_CREDENTIAL_FILE_KEYS = ("credentials_json",)
#: The sections of clearml.conf (and clearml-agent's) that are read for credentials.
_CONF_SECTIONS = ("api", "sdk", "agent", "environment")

_MIN_SECRET_LEN = 6  # shorter values would redact ordinary text
_REDACTED = "[d2ops: line removed from the recorded diff: it looked like a credential]"
_PEM_ARMOUR = re.compile(r"^-----(BEGIN|END) [A-Z0-9 ]+-----$")


def _fragments(value: object) -> Iterator[str]:
    """The matchable pieces of a credential: itself, or each line of a multi-line one (a PEM key,
    whose lines a JSON file holds joined by ``\\n`` escapes), and the parts of URI userinfo."""
    if not isinstance(value, str):
        return
    lines = re.split(r"\r?\n|\\n", value)
    for line in (value,) if len(lines) == 1 else lines:
        line = line.strip()
        if line and not _PEM_ARMOUR.match(line):
            yield line
    yield from _userinfo_fragments(value)


def _userinfo_fragments(text: str) -> Iterator[str]:
    """``user:password``, ``user`` and ``password`` of every URI with credentials in ``text``."""
    for userinfo in uri_userinfo(text):
        yield userinfo
        yield from userinfo.split(":", 1)


def _walk(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(key, leaf value) of every leaf of a parsed config tree (HOCON, JSON), at any depth; the
    items of a list of plain values count under the list's key."""
    if hasattr(node, "items"):
        for name, value in node.items():
            yield from _walk(value, str(name))
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)
    else:
        yield key, node


def _credential_file_values(path: object) -> Iterator[str]:
    """The secrets inside a credentials file (a Google service-account or OAuth JSON), if readable."""
    if not isinstance(path, str) or not path.strip():
        return
    file = Path(os.path.expandvars(path.strip())).expanduser()
    try:
        if not file.is_file() or file.stat().st_size > 1_000_000:
            return
        data = json.loads(file.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return
    yield from tree_secret_values(data)


def tree_secret_values(tree: Any) -> set[str]:
    """Credential values in a parsed config tree (clearml.conf, a credentials JSON file).

    Every string under a credential-looking key (:func:`is_secret_name`), the userinfo of every
    URI (``s3://KEY:SECRET@host``), and what the credentials files it names hold.
    """
    values: set[str] = set()
    for key, value in _walk(tree):
        if key.lower() in _CREDENTIAL_FILE_KEYS or key in CREDENTIAL_FILE_ENV:
            values.update(_credential_file_values(value))
        elif is_secret_name(key) or key in SECRET_ENV:
            # HOCON reads an unquoted numeric secret as a number
            scalar = isinstance(value, (int, float)) and not isinstance(value, bool)
            values.update(_fragments(str(value) if scalar else value))
        elif isinstance(value, str):
            values.update(_userinfo_fragments(value))
    return values


def clearml_conf_secret_values() -> set[str]:
    """Credential values in the clearml.conf ClearML itself reads (``CLEARML_CONFIG_FILE`` and the
    usual search paths): ``api.credentials``, ``sdk.aws.s3`` (default and per-bucket), Azure
    ``account_key``, Google ``credentials_json`` files, ``agent.git_pass``, the ``environment``
    section. Empty without ClearML; a malformed file only warns."""
    values: set[str] = set()
    for section in _CONF_SECTIONS:
        try:
            tree = config_obj.get(section, None)
        except Exception as exc:  # a malformed clearml.conf must not break the run
            log.warning("could not read %s from clearml.conf: %s", section, type(exc).__name__)
            continue
        if tree is not None:
            values |= tree_secret_values({section: tree})
    return values


def env_secret_values(environ: dict[str, str] | None = None) -> set[str]:
    """Credential values in the environment: :data:`SECRET_ENV`, any variable named like a credential,
    the files :data:`CREDENTIAL_FILE_ENV` name, and the userinfo of any URI in any variable."""
    environ = dict(os.environ if environ is None else environ)
    values: set[str] = set()
    for name, value in environ.items():
        if name in CREDENTIAL_FILE_ENV:
            values.update(_credential_file_values(value))
        elif name in SECRET_ENV or is_secret_name(name):
            values.update(_fragments(value))
        else:
            values.update(_userinfo_fragments(value))
    return values


def known_secret_values() -> set[str]:
    """Every credential value this process can see: the environment and clearml.conf.

    Values shorter than 6 characters are left out: they would redact ordinary text.
    """
    values = env_secret_values() | clearml_conf_secret_values()
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
