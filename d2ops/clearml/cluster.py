"""What a ClearML cluster needs from a d2ops pipeline before the first step runs.

- :func:`step_task_spec`: how each step's template task is created (entry script, docker image
  and arguments, and the packages it records: torch, torchvision and detectron2 included, pinned
  to what the d2ops image holds, since agents and the UI read them from there).
- :func:`queue_warnings`: queues that do not exist or that no clearml-agent serves. ClearML
  leaves such a pipeline Pending forever without a word; d2ops says so at launch.
- :func:`storage_warnings`: the MinIO traps (a host without its port, ``secure`` mismatches)
  that make ClearML send requests to AWS or fail a TLS handshake on the worker.
- :func:`preflight`: all of the above for one config, run by ``d2ops pipeline`` before launching.

Agents must run the steps with the image's own Python (torch and a compiled detectron2 are
already there): tasks carry ``CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL=1`` in their docker
arguments, and the agent's clearml.conf sets ``agent.package_manager.system_site_packages``.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from clearml.backend_api.session.client import APIClient

from d2ops.clearml.session import TASK_TYPES
from d2ops.config import ConfigError, ExperimentConfig
from d2ops.config_secrets import DOCKER_ARGS_ADVICE, docker_args_credentials, docker_env
from d2ops.storage import s3 as storage
from d2ops.storage.credentials import clearml_credentials, env_has_credentials, normalise_host

__all__ = [
    "AGENT_ENV",
    "DETECTRON2_COMMIT",
    "DETECTRON2_REQUIREMENT",
    "IMAGE_TORCH",
    "IMAGE_TORCHVISION",
    "agent_requirements",
    "fetch_queue_state",
    "preflight",
    "queue_warnings",
    "resume_warnings",
    "step_docker_args",
    "step_task_spec",
    "storage_warnings",
    "with_agent_env",
]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

#: detectron2 is not on PyPI: the image builds it from this commit (docker/Dockerfile, ARG DETECTRON2_COMMIT).
DETECTRON2_COMMIT = "e0ec4e189d438848521aee7926f9900e114229f5"
DETECTRON2_REQUIREMENT = f"detectron2 @ git+https://github.com/facebookresearch/detectron2.git@{DETECTRON2_COMMIT}"
#: torch and torchvision of the image's base (docker/Dockerfile, ARG BASE_IMAGE).
IMAGE_TORCH = "2.5.1"
IMAGE_TORCHVISION = "0.20.1"

#: Environment every step container gets: use the image's Python, install nothing.
AGENT_ENV = {"CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL": "1"}

_STEP_SCRIPT = "tasks/{step}.py"
_PKG_NAME = re.compile(r"^\s*([A-Za-z0-9_.\-]+)")
_IMAGE_PROVIDED = {"torch", "torchvision", "detectron2", "installer", "moto"}


def _project_requirements() -> list[str]:
    """d2ops's runtime requirements: pyproject.toml in a checkout, the installed metadata otherwise."""
    pyproject = REPO_ROOT / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])
    return [req for req in metadata.requires("d2ops") or [] if "extra ==" not in req]


def agent_requirements() -> list[str]:
    """The packages a step task records: torch, torchvision and detectron2 pinned as in the image
    (an auto-detected list from a laptop misses detectron2 and names the laptop's torch build),
    then d2ops's own requirements. ``moto`` (the offline S3 server) and ``installer`` are left out."""
    pinned = [f"torch=={IMAGE_TORCH}", f"torchvision=={IMAGE_TORCHVISION}", DETECTRON2_REQUIREMENT]
    rest = []
    for requirement in _project_requirements():
        match = _PKG_NAME.match(requirement)
        name = match.group(1).lower().split("[")[0] if match else ""
        if name and name not in _IMAGE_PROVIDED:
            rest.append(requirement)
    return pinned + rest


def with_agent_env(docker_args: str | None) -> str:
    """``docker_args`` plus the agent environment (:data:`AGENT_ENV`), unless they already set it.

    Every docker argument a task gets passes through here, so the one credential rule
    (:func:`d2ops.config_secrets.docker_args_credentials`) is checked here too, whatever their source:
    :class:`~d2ops.config.ConfigError` names the variable, never its value.
    """
    try:
        names = docker_args_credentials(docker_args)
        own = shlex.split(docker_args or "")
    except ValueError as err:
        raise ConfigError(f"docker arguments: {err}") from None
    if names:
        raise ConfigError(f"docker arguments must not carry credentials ({', '.join(names)}): {DOCKER_ARGS_ADVICE}")
    already = {name for name, _ in docker_env(own)}
    for key, value in AGENT_ENV.items():
        if key not in already:
            own += ["-e", f"{key}={value}"]
    return shlex.join(own)


def step_docker_args(cfg: ExperimentConfig, step: str) -> str:
    """The step's docker arguments from config, plus the agent environment (no credentials, ever)."""
    return with_agent_env(cfg.clearml.step(step).docker_args)


def step_task_spec(step: str, cfg: ExperimentConfig) -> dict[str, Any]:
    """Keyword arguments for ``Task.create`` of a step's template task (run from the repo root)."""
    execution = cfg.clearml.step(step)
    return {
        "project_name": cfg.clearml.project,
        "task_name": step,
        "task_type": TASK_TYPES[step],
        "script": _STEP_SCRIPT.format(step=step),
        "working_directory": ".",
        "packages": agent_requirements(),
        "docker": execution.docker_image,
        "docker_args": step_docker_args(cfg, step),
        "add_task_init_call": False,
    }


# --------------------------------------------------------------------------- queues and workers


def queue_warnings(
    wanted: Mapping[str, str], queues: Iterable[Mapping[str, Any]], workers: Iterable[Mapping[str, Any]]
) -> list[str]:
    """Problems with the queues a pipeline uses: missing, or served by no clearml-agent.

    ``wanted`` maps a role (``train``, ``controller``...) to a queue name; ``queues`` and
    ``workers`` are the server's records (``queues.get_all``/``workers.get_all`` as dicts: a
    queue has ``id`` and ``name``, a worker has ``id`` and ``queues``, a list of queue ids or
    ``{"id": ...}`` entries).
    """
    by_name = {q["name"]: q["id"] for q in queues}
    served: dict[str, list[str]] = {}
    for worker in workers:
        for entry in worker.get("queues") or []:
            queue_id = entry.get("id") if isinstance(entry, Mapping) else entry
            served.setdefault(str(queue_id), []).append(str(worker.get("id")))
    problems = []
    for name in sorted(set(wanted.values())):
        roles = ", ".join(sorted(role for role, queue in wanted.items() if queue == name))
        if name not in by_name:
            problems.append(
                f"queue '{name}' ({roles}) does not exist on the ClearML server: create it "
                "(scripts/cluster-setup.sh does) or point clearml.queues at an existing queue"
            )
        elif not served.get(by_name[name]):
            mode = "--services-mode " if "controller" in roles.split(", ") else ""
            problems.append(
                f"no clearml-agent serves queue '{name}' ({roles}): the pipeline would stay Pending. "
                f"Start one: clearml-agent daemon --queue {name} --docker {mode}(docker/docker-compose.yml has them)"
            )
    return problems


def fetch_queue_state() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The server's queues and workers as plain dicts (needs a ClearML server)."""
    client = APIClient()
    queues = [{"id": q.id, "name": q.name} for q in client.queues.get_all()]
    workers = []
    for worker in client.workers.get_all():
        ids = [getattr(q, "id", q) for q in (getattr(worker, "queues", None) or [])]
        workers.append({"id": worker.id, "queues": ids})
    return queues, workers


# --------------------------------------------------------------------------- storage traps


def _s3_uris(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    found = [("data.source", cfg.data.source), ("model.weights", cfg.model.weights or "")]
    found += [("model.config_file", cfg.model.config_file or ""), ("clearml.output_uri", cfg.clearml.output_uri or "")]
    found.append(("inference.source", cfg.inference.source or ""))
    return [(key, uri) for key, uri in found if storage.is_s3_uri(uri)]


def storage_warnings(cfg: ExperimentConfig, credentials: Sequence[Mapping[str, Any]] | None = None) -> list[str]:
    """The MinIO traps, found from the config and clearml.conf's ``sdk.aws.s3.credentials``.

    - a credentials ``host`` without a port (ClearML then sends those requests to AWS);
    - a ``host`` written as a URL, whose scheme disagrees with ``secure``;
    - an ``s3://name.with.dots/...`` URI without a port that is read as an AWS bucket, while a
      credentials entry says ``name.with.dots:PORT`` is an endpoint;
    - an endpoint URI whose host has no credentials entry (the worker then has no keys for it).
    """
    entries = list(clearml_credentials() if credentials is None else credentials)
    problems = []
    hosts = {}
    for entry in entries:
        raw = str(entry.get("host") or "").strip()
        if not raw:
            continue
        bare = normalise_host(raw)
        hosts[bare] = entry
        if ":" not in bare:
            problems.append(
                f"clearml.conf credentials host '{raw}' has no port: ClearML sends its requests to AWS. "
                f'Write it as host: "{bare}:9000" (MinIO\'s port), and use the port in s3:// URIs too'
            )
        scheme = raw.split("://", 1)[0].lower() if "://" in raw else None
        secure = entry.get("secure")
        if scheme and secure is not None and (scheme == "https") != bool(secure):
            problems.append(
                f"clearml.conf credentials host '{raw}' says {scheme} but secure: {str(secure).lower()}: "
                "write the bare host:port and set secure to match the server (false for plain-http MinIO)"
            )
    for key, uri in _s3_uris(cfg):
        first = uri[len("s3://") :].split("/", 1)[0]
        if ":" in first:
            if first.lower() not in hosts and not env_has_credentials():
                problems.append(
                    f"{key} {uri}: no sdk.aws.s3.credentials entry for host '{first}' in clearml.conf; "
                    "workers need one (with secure and multipart: false for MinIO)"
                )
            continue
        with_port = [host for host in hosts if host.split(":")[0] == first.lower() and ":" in host]
        if with_port:
            problems.append(
                f"{key} {uri}: '{first}' has no port, so it is read as an AWS bucket; "
                f"write s3://{with_port[0]}/... to use that endpoint"
            )
    return problems


# --------------------------------------------------------------------------- all together


def resume_warnings(cfg: ExperimentConfig) -> list[str]:
    """A train step that retries must mirror its checkpoints somewhere every worker can read."""
    if cfg.clearml.output_uri or cfg.clearml.step("train").retries == 0:
        return []
    return [
        "clearml.output_uri is not set: a retried train step resumes on another worker only if the agents set "
        "sdk.development.default_output_uri (docker/clearml-agent.conf does); otherwise it starts from iteration 0"
    ]


def preflight(cfg: ExperimentConfig, *, check_queues: bool = True) -> list[str]:
    """Every warning for launching ``cfg`` on a cluster; logged, and returned for the caller."""
    problems = storage_warnings(cfg) + resume_warnings(cfg)
    if check_queues:
        wanted = {role: getattr(cfg.clearml.queues, role) for role in type(cfg.clearml.queues).model_fields}
        try:
            problems += queue_warnings(wanted, *fetch_queue_state())
        except Exception as err:  # no server / no permission: the launch itself will say so
            log.debug("could not read queues and workers", exc_info=True)
            problems.append(f"could not check queues and workers on the ClearML server: {type(err).__name__}: {err}")
    for problem in problems:
        log.warning("%s", problem)
    if problems:
        print(f"d2ops preflight: {len(problems)} warning(s) above", file=sys.stderr)
    return problems
