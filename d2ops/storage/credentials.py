"""S3 credentials as d2ops finds them: the environment (boto3's own chain) first, then clearml.conf's
``sdk.aws.s3.credentials`` entries, matched by endpoint host or, on AWS, by bucket."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["clearml_credentials", "conf_entry", "env_has_credentials", "normalise_host", "use_conf_credentials"]


#: Where clearml.conf's ``sdk.aws.s3.credentials`` entries come from: installed by the ClearML layer
#: (:func:`d2ops.clearml.install`, run when ``d2ops.clearml`` is imported), so storage never imports ClearML.
_conf_credentials_source: Callable[[], Sequence[Mapping[str, Any]]] | None = None


def use_conf_credentials(source: Callable[[], Sequence[Mapping[str, Any]]] | None) -> None:
    """Install the reader of clearml.conf's S3 credential entries (``None`` removes it)."""
    global _conf_credentials_source
    _conf_credentials_source = source
    clearml_credentials.cache_clear()


@lru_cache(maxsize=1)
def clearml_credentials() -> tuple[dict[str, Any], ...]:
    """The ``sdk.aws.s3.credentials`` entries of clearml.conf, or () without ClearML or a config.

    Read once per process through ClearML's own loader (the installed source), so
    ``CLEARML_CONFIG_FILE`` and the usual search paths apply exactly as they do for ClearML itself.
    """
    if _conf_credentials_source is None:
        return ()
    try:
        entries = _conf_credentials_source() or []
    except Exception as exc:  # a malformed clearml.conf must not break transfers that do not need it
        logger.warning("could not read sdk.aws.s3.credentials from clearml.conf: %s", type(exc).__name__)
        return ()
    return tuple(dict(entry) for entry in entries)


def normalise_host(host: str) -> str:
    """A credentials ``host`` as d2ops compares them: no scheme, no trailing slash, lower case."""
    return re.sub(r"^https?://", "", str(host).strip()).rstrip("/").lower()


def conf_entry(*, host: str | None = None, bucket: str | None = None) -> dict[str, Any] | None:
    """The clearml.conf credentials entry for an endpoint host, or for an AWS bucket (no host)."""
    for entry in clearml_credentials():
        entry_host = entry.get("host")
        if host is not None and entry_host and normalise_host(entry_host) == normalise_host(host):
            return entry
        if bucket is not None and not entry_host and entry.get("bucket") == bucket:
            return entry
    return None


def env_has_credentials() -> bool:
    """Whether the environment gives boto3 credentials (keys or a profile), which win over clearml.conf's."""
    env = os.environ
    keys = env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")
    return bool(env.get("AWS_PROFILE") or keys)
