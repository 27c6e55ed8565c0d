"""The one credential rule: which names hold credentials, and where a value would carry one.

Every place a value enters d2ops asks this module: config keys at any depth (YAML files, ``--set``,
``d2ops schedule --set``, hyperparameters edited in the ClearML UI, all validated by
:mod:`d2ops.config`), the environment variables that docker arguments set (``-e K=V``, ``--env K=V``,
``--env=K=V``, ``-eK=V``, quoted or not), and the names :mod:`d2ops.clearml.secrets` reads
credential values by (the environment, clearml.conf) to keep them out of recorded diffs.

A name holds a credential (:func:`is_secret_name`) when, split into words (``_``, ``.``, ``-``,
camelCase):

- it is one of :data:`SECRET_ENV`;
- it contains ``secret``, ``password``, ``passwd``, ``passphrase``, ``credential``, ``private_key``,
  ``api_key``/``apikey``, ``access_key``, ``account_key`` or ``connection_string``;
- a word is ``pass``;
- its last word is ``key``, ``token``, ``pat`` or ``pwd`` (not ``PWD`` alone, the working directory).

A name whose last word is ``file``, ``path`` or ``dir`` names *where* a credential is
(``POSTGRES_PASSWORD_FILE=/run/secrets/db``, ``GOOGLE_APPLICATION_CREDENTIALS`` is listed in
:data:`CREDENTIAL_FILE_ENV`): it is not a credential. ``KEY_FRAME_INTERVAL``, ``MODEL.KEYPOINT_ON``,
``TOKENIZERS_PARALLELISM``, ``CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL`` and ``AWS_DEFAULT_REGION`` are not.

Any value that is a URI with credentials (``s3://KEY:SECRET@host``) is one, whatever its name.

This module imports nothing of d2ops: the config layer and everything above it share it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Sequence

__all__ = [
    "CREDENTIAL_FILE_ENV",
    "DOCKER_ARGS_ADVICE",
    "SECRET_ENV",
    "docker_args_credentials",
    "docker_env",
    "has_uri_credentials",
    "is_secret_name",
    "uri_userinfo",
]

#: Environment variables whose values are credentials (any other name the rule matches counts too).
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "CLEARML_API_ACCESS_KEY",
    "CLEARML_API_SECRET_KEY",
    "CLEARML_AUTH_TOKEN",
    "TRAINS_API_ACCESS_KEY",
    "TRAINS_API_SECRET_KEY",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "D2OPS_SERVE_TOKEN",
)
#: Environment variables that name a credentials *file*: the path is not a secret (it is in docs
#: and logs), the keys inside the file are.
CREDENTIAL_FILE_ENV = ("GOOGLE_APPLICATION_CREDENTIALS",)

#: What to do instead, for an error about docker arguments (README "Secrets", clearml.conf.example).
DOCKER_ARGS_ADVICE = (
    "ClearML shows docker arguments in the UI and records them as hyperparameters: give the container the "
    "variable by name only (-e NAME, docker takes the value from the agent's environment, e.g. docker/.env), "
    "or from an --env-file on the worker, or the agent's clearml.conf (agent.extra_docker_arguments); "
    "S3 keys go in clearml.conf (sdk.aws.s3.credentials)"
)

_SECRET_PARTS = (
    "secret",
    "password",
    "passwd",
    "passphrase",
    "credential",
    "private_key",
    "privatekey",
    "api_key",
    "apikey",
    "access_key",
    "account_key",
    "connection_string",
)
_SECRET_WORDS = frozenset({"pass"})
_SECRET_LAST_WORDS = frozenset({"key", "token", "pat", "pwd"})
_LOCATION_WORDS = frozenset({"file", "path", "dir"})
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
# ``scheme://userinfo@``: credentials written into a URI (s3://KEY:SECRET@host/bucket, https://user:pw@host).
_URI_USERINFO = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://([^\s/?#@]+)@")
# docker run's boolean short flags that may come before ``e`` in one word (``-ite K=V``).
_ENV_SHORT = re.compile(r"-[ditP]*e(.*)", re.DOTALL)


def _words(name: object) -> list[str]:
    normal = re.sub(r"[^a-z0-9]+", "_", _CAMEL.sub(r"\1_\2", str(name)).lower()).strip("_")
    return normal.split("_") if normal else []


def is_secret_name(name: object) -> bool:
    """Whether a setting or variable called ``name`` holds a credential (the rule in the module docstring).

    ``secret_key``, ``key``, ``git_pass``, ``DB_PASS``, ``auth_token``, ``GITHUB_PAT``, ``WANDB_API_KEY``,
    ``AZURE_STORAGE_KEY``, ``PRIVATE_KEY_PEM``, ``clientSecret``; not ``key_prefix``, ``KEY_FRAME_INTERVAL``,
    ``TOKENIZERS_PARALLELISM``, ``PWD`` or ``POSTGRES_PASSWORD_FILE``.
    """
    if str(name).upper() in SECRET_ENV:
        return True
    words = _words(name)
    if not words or str(name).upper() in CREDENTIAL_FILE_ENV or (len(words) > 1 and words[-1] in _LOCATION_WORDS):
        return False
    joined = "_".join(words)
    return (
        any(part in joined for part in _SECRET_PARTS)
        or any(word in _SECRET_WORDS for word in words)
        or (words[-1] in _SECRET_LAST_WORDS and words != ["pwd"])
    )


def uri_userinfo(text: str) -> list[str]:
    """The userinfo (``user:password``) of every URI with credentials in ``text``."""
    return [match.group(1) for match in _URI_USERINFO.finditer(text)]


def has_uri_credentials(value: object) -> bool:
    return isinstance(value, str) and _URI_USERINFO.search(value) is not None


def _split(args: str | Sequence[str]) -> list[str]:
    """Docker arguments as the words docker gets (a string is split as a shell would)."""
    if not isinstance(args, str):
        return [str(arg) for arg in args]
    try:
        return shlex.split(args)
    except ValueError as err:  # the message is shlex's ("No closing quotation"), never the text
        raise ValueError(f"docker arguments are not valid shell words: {err}") from None


def _env_items(words: list[str]) -> Iterator[str]:
    """The ``NAME[=VALUE]`` item of every ``-e``/``--env`` in ``words``, in any spelling."""
    index = 0
    while index < len(words):
        word = words[index]
        attached: str | None = None
        if word == "--env":
            attached = ""
        elif word.startswith("--env="):
            attached = word.removeprefix("--env=")
        elif match := _ENV_SHORT.fullmatch(word):
            attached = match.group(1)
        if attached == "" and index + 1 < len(words):
            index += 1
            attached = words[index]
        if attached:
            yield attached
        index += 1


def docker_env(args: str | Sequence[str]) -> list[tuple[str, str | None]]:
    """``(NAME, VALUE)`` of every variable docker arguments set (``-e K=V``, ``--env K=V``, ``--env=K=V``,
    ``-eK=V``); VALUE is None for ``-e NAME`` (docker takes it from its own environment). Raises
    :class:`ValueError` for text a shell cannot split (the message never quotes it)."""
    out: list[tuple[str, str | None]] = []
    for item in _env_items(_split(args)):
        name, sep, value = item.partition("=")
        out.append((name, value if sep else None))
    return out


def docker_args_credentials(args: str | Sequence[str] | None) -> list[str]:
    """The names of the credentials docker arguments carry *by value*, never the values: every variable
    set with a credential's name (:func:`is_secret_name`) and a value, every variable whose value is a URI
    with credentials, and any other ``NAME=VALUE`` word of that kind (``--label api_token=...``).
    ``-e NAME`` (the value comes from the agent's environment) and ``--env-file`` hold no value: allowed.
    Raises :class:`ValueError` for text a shell cannot split."""
    if not args:
        return []
    words = _split(args)
    # any other NAME=VALUE word: a flag's value (-l K=V, --log-opt=K=V) or a word of its own
    others = [word.partition("=")[2] if word.startswith("--") else word for word in words if "=" in word]
    items = list(_env_items(words)) + [item for item in others if "=" in item and not item.startswith("-")]
    found: list[str] = []
    for item in items:
        name, sep, value = item.partition("=")
        secret = (is_secret_name(name) and value != "") or has_uri_credentials(value)
        if sep and secret and name not in found:
            found.append(name if not has_uri_credentials(name) else "<a name holding a URI with credentials>")
    found += ["<a URI with credentials>" for word in words if "=" not in word and has_uri_credentials(word)][:1]
    return found
