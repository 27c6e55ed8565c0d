"""The shipped cluster files agree: one S3 name, its buckets, the weights, the image tag, the smoke test.

- One S3 name (``minio.local:9000``) and three buckets: every ``s3://host:port/bucket`` in the configs (loaded
  through ``load_config``, so ``_BASE_`` applies, and as text, comments included), README, the scripts and both
  ``clearml.conf`` files (parsed with ClearML's own HOCON parser) has that host:port, which has a credentials
  entry in both conf files and is MinIO's alias on the network the agents' task containers join; every bucket
  is one that ``minio-init`` creates.
- The COCO weights the configs name are the ones ``scripts/cluster-setup.sh weights`` uploads, and it does
  upload them (to a local S3 endpoint, moto), from a local folder or a download, once.
- The training image's tag is set in one place: ``D2OPS_IMAGE`` (docker/.env), read by the compose file and,
  for every config, by d2ops.
- ``scripts/cluster-smoke.sh``: with ``CLEARML_API_HOST`` set it runs no Docker command; the URIs it launches
  with pass d2ops's launch checks; its wait finds a controller in ``<project>/.pipelines/<name>`` (a hidden
  sub-project) on a ClearML server stand-in that answers ``tasks.get_all`` as clearml-server does.
- ``.github/workflows/images.yml`` builds the images with the compose file's contexts, checked against
  SchemaStore's GitHub workflow schema where ``check-jsonschema`` (which vendors it) is installed. actionlint
  is not installable here (its PyPI package downloads a binary at build time): expressions and action inputs
  are not checked.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from d2ops.config import load_config

from .test_docker import DUMMY_ENV, _compose, _option

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
AGENT_CONF = DOCKER / "clearml-agent.conf"
CONF_EXAMPLE = ROOT / "clearml.conf.example"
ENV_EXAMPLE = DOCKER / ".env.example"
README = ROOT / "README.md"
SETUP = ROOT / "scripts" / "cluster-setup.sh"
SMOKE = ROOT / "scripts" / "cluster-smoke.sh"
WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"
ALL_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
EXPERIMENTS = sorted((ROOT / "configs").glob("*.yaml"))  # base/ holds fragments, not experiments

S3_NAME = "minio.local:9000"
BUCKETS = {"datasets", "models", "clearml"}
#: s3://host:port/bucket... (placeholders such as s3://host:port/... or s3://bucket/prefix have no numeric port)
S3_URI = re.compile(r"s3://([A-Za-z0-9.-]+:\d+)(?:/([a-z0-9][a-z0-9.-]*[a-z0-9])(?=[/`'\")\s]|$))?")
AGENTS = ("agent-cpu", "agent-services", "agent-gpu")
#: ``make demo``'s offline run: demo.yaml (and smoke.yaml, its base) read the data from the local S3 endpoint
#: that the demo starts on this machine, never from the cluster. The only other endpoint a shipped file names.
OFFLINE_DEMO = {"demo.yaml": ("127.0.0.1:9000", "d2ops-demo"), "smoke.yaml": ("127.0.0.1:9000", "d2ops-demo")}


def _uris(text: str) -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in S3_URI.finditer(text)]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _hocon(path: Path) -> Any:
    from clearml.utilities.pyhocon import ConfigFactory

    return ConfigFactory.parse_file(str(path), resolve=False)


@functools.cache
def _raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _minio_init_buckets() -> set[str]:
    script = " ".join(_raw_compose()["services"]["minio-init"]["command"])
    found = re.search(r"for bucket in ([\w ]+); do mc mb", script)
    assert found, "minio-init must create its buckets with `for bucket in ...; do mc mb`"
    return set(found.group(1).split())


def _env_example() -> dict[str, str]:
    lines = [line for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def _script_default(script: Path, name: str) -> str:
    found = re.search(rf"^{name}=\$\{{{name}:-([^}}]+)\}}$", script.read_text(), re.MULTILINE)
    assert found, f"{script.name} must set {name}=${{{name}:-...}}"
    return found.group(1)


def _setup_weights() -> list[str]:
    block = re.search(r"^WEIGHTS=\(\n(.*?)\n\)$", SETUP.read_text(), re.MULTILINE | re.DOTALL)
    assert block, "cluster-setup.sh lists the model-zoo files it uploads in WEIGHTS=( ... )"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- one S3 name, its buckets ----------------------------------------------------------------------------


def _every_s3_uri() -> dict[str, list[tuple[str, str | None]]]:
    """Where each s3://host:port URI of the shipped files is, by file."""
    found: dict[str, list[tuple[str, str | None]]] = {}
    for path in EXPERIMENTS:
        cfg = load_config(path)
        uris = [u for s in _strings(cfg.model_dump()) for u in _uris(s)]
        found[f"{path.name} (loaded)"] = [u for u in uris if u != OFFLINE_DEMO.get(path.name)]
    for path in [*ALL_CONFIGS, README, ENV_EXAMPLE, COMPOSE_FILE, *sorted(DOCKER.glob("Dockerfile*"))]:
        uris = _uris(path.read_text())
        found[str(path.relative_to(ROOT))] = [u for u in uris if u != OFFLINE_DEMO.get(path.name)]
    for path in (AGENT_CONF, CONF_EXAMPLE):
        conf = _hocon(path)
        found[f"{path.name} default_output_uri"] = _uris(conf.get("sdk.development.default_output_uri"))
    for script in (SETUP, SMOKE):
        endpoint = _script_default(script, "S3_ENDPOINT")
        text = script.read_text().replace("$S3_ENDPOINT", endpoint)
        found[script.name] = _uris(text)
    return found


def test_every_shipped_s3_uri_uses_the_one_name_and_a_bucket_minio_init_creates() -> None:
    made = _minio_init_buckets()
    assert made == BUCKETS
    found = _every_s3_uri()
    for where in ("balloon.yaml (loaded)", "roboflow.yaml (loaded)", "README.md", "cluster-smoke.sh"):
        assert found[where], f"{where}: no s3://host:port URI found (the test's pattern is stale?)"
    wrong = {where: uris for where, uris in found.items() if any(host != S3_NAME for host, _ in uris)}
    assert not wrong, f"every s3:// URI must use {S3_NAME}: {wrong}"
    unknown = {where: [b for _, b in uris if b and b not in made] for where, uris in found.items()}
    assert not any(unknown.values()), f"buckets minio-init does not create ({sorted(made)}): {unknown}"
    used = {b for uris in found.values() for _, b in uris if b}
    assert {"datasets", "models", "clearml"} <= used


def test_both_conf_files_have_credentials_for_the_one_name() -> None:
    for path in (AGENT_CONF, CONF_EXAMPLE):
        entries = list(_hocon(path).get("sdk.aws.s3.credentials"))
        hosts = [entry["host"] for entry in entries]
        assert hosts == [S3_NAME], f"{path.name}: credentials hosts {hosts}"
        assert entries[0]["secure"] is False and entries[0]["multipart"] is False
    # the README's agent settings say the same
    assert set(re.findall(r'host: "([^"]+)"', README.read_text())) == {S3_NAME}


def test_the_one_name_resolves_inside_the_compose_network() -> None:
    """MinIO's alias on the network the agents' task containers join, and its published port is the name's."""
    host, port = S3_NAME.split(":")
    compose = _raw_compose()
    minio = compose["services"]["minio"]
    args = list(_hocon(AGENT_CONF).get("agent.extra_docker_arguments"))
    network = _option(args, "--network")
    (key,) = [k for k, v in compose["networks"].items() if v["name"] == network]
    assert host in minio["networks"][key]["aliases"]
    assert any(p.rsplit(":", 2)[-2:] == [port, port] for p in minio["ports"])
    for name in AGENTS:
        assert key in compose["services"][name]["networks"]
    init = " ".join(compose["services"]["minio-init"]["command"])
    assert f"mc alias set local http://{S3_NAME} " in init
    assert "minio:9000" not in COMPOSE_FILE.read_text()


def test_scripts_check_the_name_and_say_the_hosts_line() -> None:
    assert _script_default(SETUP, "S3_ENDPOINT") == S3_NAME == _script_default(SMOKE, "S3_ENDPOINT")
    assert "127.0.0.1 minio.local" in README.read_text()


# --- the weights the configs name --------------------------------------------------------------------------


def test_every_configured_weights_uri_is_one_cluster_setup_uploads() -> None:
    zoo = _setup_weights()
    assert len(zoo) == len(set(zoo)) >= 2
    uploaded = {f"s3://{S3_NAME}/models/detectron2/{path}": path for path in zoo}
    named = set()
    for path in EXPERIMENTS:
        cfg = load_config(path)
        weights = cfg.model.weights or ""
        if weights.startswith("s3://"):
            assert weights in uploaded, f"{path.name}: model.weights {weights} is not uploaded by cluster-setup.sh"
            # and they are the weights of the model the config builds (the zoo's path follows its config name)
            assert cfg.model.zoo_config and uploaded[weights].startswith(
                cfg.model.zoo_config.removesuffix(".yaml") + "/"
            )
            named.add(weights)
    for path in ALL_CONFIGS:  # fragments and comments too
        for uri in re.findall(r"s3://[\w.-]+:\d+/models/[^\s`'\"]+", path.read_text()):
            assert uri in uploaded, f"{path.name}: {uri} is not uploaded by cluster-setup.sh"
    assert named == set(uploaded), "cluster-setup.sh uploads weights no config names"


def _setup_env(env_file: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(env_file.parent),
        "ENV_FILE": str(env_file),
        "PY": sys.executable,
        "CLEARML_CONFIG_FILE": str(env_file.parent / "no-clearml.conf"),
        **extra,
    }
    return env


def _run_setup(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SETUP), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.fixture
def moto_s3() -> Iterator[str]:
    """A local S3 endpoint (moto) as host:port, with the stack's buckets."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto keeps its buckets per process, not per server: start from none
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"), timeout=10)
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
        aws_access_key_id="dummy-s3-key", aws_secret_access_key="dummy-s3-secret",
    )  # fmt: skip
    for bucket in BUCKETS:
        client.create_bucket(Bucket=bucket)
    yield f"127.0.0.1:{port}"
    server.stop()


def _objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client(
        "s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1",
        aws_access_key_id="dummy-s3-key", aws_secret_access_key="dummy-s3-secret",
    )  # fmt: skip
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


@pytest.mark.slow  # 5 s or more on 2 cores: four d2ops processes
def test_cluster_setup_weights_uploads_each_file_once(tmp_path: Path, moto_s3: str) -> None:
    """One weight file from a local folder (D2OPS_WEIGHTS_DIR, by name), the other downloaded from the model
    zoo's URL layout (a local HTTP server here); a second run finds both in S3 and reads neither."""
    first, second = _setup_weights()[:2]
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in DUMMY_ENV.items()))
    local = tmp_path / "local-weights"
    local.mkdir()
    (local / Path(first).name).write_bytes(b"\x80\x04local-weights")
    zoo = tmp_path / "zoo"
    (zoo / second).parent.mkdir(parents=True)
    (zoo / second).write_bytes(b"\x80\x04downloaded-weights")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(zoo))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        env = _setup_env(
            env_file,
            S3_ENDPOINT=moto_s3,
            D2OPS_WEIGHTS_DIR=str(local),
            WEIGHTS_CACHE=str(tmp_path / "cache"),
            MODEL_ZOO_URL=f"http://127.0.0.1:{httpd.server_address[1]}",
        )
        done = _run_setup("weights", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert _objects(moto_s3, "models") == {
        f"detectron2/{first}": b"\x80\x04local-weights",
        f"detectron2/{second}": b"\x80\x04downloaded-weights",
    }
    for secret in (DUMMY_ENV["D2OPS_S3_SECRET_KEY"], DUMMY_ENV["MINIO_ROOT_PASSWORD"]):
        assert secret not in done.stdout + done.stderr
    # again, with neither source reachable: nothing is read or uploaded
    (local / Path(first).name).unlink()
    env["MODEL_ZOO_URL"] = "http://127.0.0.1:9"
    env["WEIGHTS_CACHE"] = str(tmp_path / "empty-cache")
    done = _run_setup("weights", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" is there") == 2 and "uploaded" not in done.stdout


def test_cluster_setup_weights_refuses_what_is_not_a_pickle(tmp_path: Path, moto_s3: str) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in DUMMY_ENV.items()))
    local = tmp_path / "w"
    local.mkdir()
    for path in _setup_weights():  # a Git LFS pointer where the weights should be
        (local / Path(path).name).write_text("version https://git-lfs.github.com/spec/v1\n")
    done = _run_setup("weights", env=_setup_env(env_file, S3_ENDPOINT=moto_s3, D2OPS_WEIGHTS_DIR=str(local)))
    assert done.returncode != 0
    assert "is not a detectron2 .pkl" in done.stderr
    assert _objects(moto_s3, "models") == {}


def test_cluster_setup_says_the_hosts_line_when_the_name_does_not_resolve(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in DUMMY_ENV.items()))
    # .invalid never resolves (RFC 2606)
    done = _run_setup("weights", env=_setup_env(env_file, S3_ENDPOINT="minio.invalid:9000"))
    assert done.returncode != 0
    assert "'minio.invalid' does not resolve" in done.stderr and "/etc/hosts" in done.stderr
    assert "    127.0.0.1 minio.invalid" in done.stderr


# --- the image tag, set once -------------------------------------------------------------------------------


def test_the_image_tag_is_set_in_one_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No shipped config names the training image: each reads $D2OPS_IMAGE, as the compose file does, with
    the same fallback as the compose file and docker/.env.example."""
    from d2ops.config import DEFAULT_DOCKER_IMAGE

    for path in ALL_CONFIGS:
        clearml = (yaml.safe_load(path.read_text()) or {}).get("clearml") or {}
        assert "docker_image" not in clearml, f"{path.name} names the image: leave it to D2OPS_IMAGE"
        for step, settings in (clearml.get("steps") or {}).items():
            assert "docker_image" not in (settings or {}), f"{path.name}: steps.{step}.docker_image"
    text = COMPOSE_FILE.read_text()
    fallbacks = set(re.findall(r"\$\{D2OPS_IMAGE:-([^}]+)\}", text))
    assert fallbacks == {DEFAULT_DOCKER_IMAGE} == {_env_example()["D2OPS_IMAGE"]}
    assert "d2ops/detectron2" not in re.sub(r"\$\{D2OPS_IMAGE:-[^}]+\}", "", text)
    assert "default_docker" not in _hocon(AGENT_CONF).get("agent")  # the daemons' --docker is the default

    registry = "registry.example.com/team/d2ops-detectron2:v9.9.9"
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {**DUMMY_ENV, "D2OPS_IMAGE": registry}.items()))
    done = _compose("--profile", "*", "config", "--format", "json", env_file=env_file)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert {_option(services[name]["command"], "--docker") for name in AGENTS} == {registry}
    assert services["d2ops-image"]["image"] == registry
    monkeypatch.setenv("D2OPS_IMAGE", registry)
    for path in EXPERIMENTS:
        cfg = load_config(path)
        assert {cfg.clearml.step(step).docker_image for step in cfg.clearml.steps} == {registry}, path.name
    monkeypatch.delenv("D2OPS_IMAGE")
    assert load_config(EXPERIMENTS[0]).clearml.docker_image == DEFAULT_DOCKER_IMAGE


def _vendored_workflow_schema() -> dict[str, Any] | None:
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "builtin_schemas" / "vendor" / "github-workflows.json"
    return json.loads(path.read_text()) if path.is_file() else None


def test_images_workflow_builds_and_pushes_both_images_on_a_tag() -> None:
    doc = yaml.safe_load(WORKFLOW.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    assert doc["on"]["push"]["tags"] == ["v*"]
    assert doc["permissions"]["packages"] == "write"
    (job,) = doc["jobs"].values()
    assert job["timeout-minutes"] <= 180
    built = {(item["context"], item["dockerfile"]) for item in job["strategy"]["matrix"]["include"]}
    compose = _raw_compose()["services"]
    for service in ("d2ops-image", "agent-cpu"):  # the compose file's build of each image
        build = compose[service].get("build") or compose["x-agent" if service.startswith("agent") else service]["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve().relative_to(ROOT).as_posix() or "."
        dockerfile = (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve().relative_to(ROOT)
        assert (context, dockerfile.as_posix()) in built
    push = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("docker/build-push-action@"))
    assert push["with"]["push"] is True and push["with"]["file"] == "${{ matrix.dockerfile }}"
    text = WORKFLOW.read_text()
    literal = re.findall(r"(?im)^\s*([\w-]*(?:password|token|secret)[\w-]*):[ \t]*(?!\$\{\{)\S", text)
    assert not literal, f"credentials only as ${{{{ secrets.* }}}}: {literal}"
    schema = _vendored_workflow_schema()
    if schema is None:
        pytest.skip("check-jsonschema (SchemaStore's github-workflows schema) is not installed")
    from jsonschema import validators

    validator = validators.validator_for(schema)(schema)
    errors = [e.message for e in validator.iter_errors(doc)]
    assert not errors, errors
    broken = json.loads(json.dumps(doc))
    broken["jobs"]["push"]["runs-onn"] = "ubuntu-latest"
    assert list(validator.iter_errors(broken))  # the schema does catch a mistake


# --- scripts/cluster-smoke.sh --------------------------------------------------------------------------------


def _smoke_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env_file = tmp_path / ".env"
    if not env_file.exists():
        env_file.write_text("".join(f"{k}={v}\n" for k, v in {**DUMMY_ENV, "CLEARML_API_ACCESS_KEY": "k",
                                                              "CLEARML_API_SECRET_KEY": "s"}.items()))  # fmt: skip
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "ENV_FILE": str(env_file),
        "PY": sys.executable,
        "SKIP_GIT_CHECK": "1",
        **extra,
    }


def _source_smoke(commands: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """Run ``commands`` in bash after sourcing the smoke script (which then only defines its functions)."""
    script = f'source "{SMOKE}"\n{commands}\n'
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, timeout=timeout, check=False, cwd=ROOT
    )


def test_smoke_with_a_server_given_runs_no_docker(tmp_path: Path) -> None:
    """CLEARML_API_HOST set: no docker command, no compose, no cluster-setup.sh; a failure says FAILED."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "docker-calls"
    (bin_dir / "docker").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit 1\n')
    (bin_dir / "docker").chmod(0o755)
    failing_python = tmp_path / "python"
    failing_python.write_text("#!/bin/sh\nexit 3\n")
    failing_python.chmod(0o755)
    env = _smoke_env(tmp_path, CLEARML_API_HOST="http://127.0.0.1:9", PY=str(failing_python))
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    done = subprocess.run(["bash", str(SMOKE)], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert not calls.exists(), calls.read_text()
    assert done.returncode == 1
    assert "using the ClearML server at http://127.0.0.1:9 (no Docker)" in done.stdout
    assert "[cluster-setup]" not in done.stdout + done.stderr
    assert "[cluster-smoke] FAILED: could not upload the dataset to s3://minio.local:9000/" in done.stderr


_LAUNCH_CHECK = """
import argparse, json, sys
from d2ops.cli.common import add_config_args, config_overrides
from d2ops.clearml.cluster import storage_warnings
from d2ops.config import ConfigError
from d2ops.pipeline.preflight import launch_config

parser = argparse.ArgumentParser()
add_config_args(parser, "configs/demo.yaml")
args = parser.parse_args(sys.argv[2:])  # [0] this file, [1] pipelines/run_pipeline.py
print(json.dumps({"argv": sys.argv[2:]}), file=sys.stderr)
try:
    cfg = launch_config(args.config, config_overrides(args), inputs="s3")  # run_pipeline.py's launch check
except ConfigError as err:
    sys.exit(f"refused: {err}")
problems = storage_warnings(cfg)  # its preflight, with the clearml.conf the smoke script wrote
if problems:
    sys.exit(f"preflight: {problems}")
print(json.dumps({"pipeline_task_id": "0123abcd4567ef89", "project": cfg.clearml.project}))
"""


@pytest.mark.slow  # 5 s or more on 2 cores: the launch check imports detectron2
def test_smoke_launch_passes_the_launch_checks(tmp_path: Path, moto_s3: str) -> None:
    """The dataset the smoke script uploads and the URIs it launches with are one S3_ENDPOINT, with the keys it
    wrote to its clearml.conf: run_pipeline.py's launch check and preflight accept them, and the printed
    controller id is what the wait uses."""
    checker = tmp_path / "launch_check.py"
    checker.write_text(_LAUNCH_CHECK)
    stub = tmp_path / "run_pipeline_stub"
    stub.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{checker}" "$@"\n')
    stub.chmod(0o755)
    env = _smoke_env(tmp_path, S3_ENDPOINT=moto_s3, CLEARML_API_HOST="http://127.0.0.1:9")
    done = _source_smoke(
        f'WORK=$(mktemp -d -p "{tmp_path}")\nclient_environment\nupload_dataset\n'
        f'PY="{stub}" run_pipeline\necho "PIPELINE_ID=$PIPELINE_ID"',
        env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PIPELINE_ID=0123abcd4567ef89" in done.stdout
    argv = json.loads(next(line for line in done.stderr.splitlines() if line.startswith('{"argv"')))["argv"]
    launched = [arg for arg in argv if "s3://" in arg]
    assert len(launched) == 2 and all(f"s3://{moto_s3}/" in arg for arg in launched), launched
    uploaded = _objects(moto_s3, "datasets")
    prefix = argv[argv.index("--dataset-uri") + 1].split(f"s3://{moto_s3}/datasets/", 1)[1]
    assert any(key.startswith(prefix) for key in uploaded) and len(uploaded) > 10
    assert DUMMY_ENV["D2OPS_S3_SECRET_KEY"] not in done.stdout + done.stderr


@pytest.fixture
def fake_clearml() -> Iterator[Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from clearml_runtime.fake_server import FakeClearmlServer
    finally:
        sys.path.remove(str(ROOT / "tests"))

    class Server(FakeClearmlServer):  # type: ignore[misc, valid-type]
        """``tasks.get_all`` as clearml-server answers it (``apiserver/services/tasks.py`` ``get_all`` calls
        ``apiserver/services/utils.py`` ``process_include_subprojects``): a project filter matches that project
        alone unless ``include_subprojects`` is true, then the project and every project below it."""

        def _get_all_tasks(self, body: dict) -> list[dict]:
            body = dict(body)
            if body.pop("include_subprojects", False) and body.get("project"):
                wanted = body["project"] if isinstance(body["project"], list) else [body["project"]]
                names = [self.projects[p]["name"] for p in wanted if p in self.projects]
                body["project"] = [
                    pid
                    for pid, p in self.projects.items()
                    if any(p["name"] == n or p["name"].startswith(n + "/") for n in names)
                ]
            result: list[dict] = super()._get_all_tasks(body)
            return result

    server = Server().start()
    yield server
    server.stop()


def _controller(server: Any, project: str, status: str, message: str = "") -> str:
    """A pipeline controller as ClearML's PipelineController leaves it: in <project>/.pipelines/<name>, a hidden
    project, with the hidden and pipeline system tags."""
    server._ensure_project(project)
    pid = server._ensure_project(f"{project}/.pipelines/smoke pipeline", system_tags=["hidden"])
    with server.lock:
        task_id: str = server.ep_tasks__create(
            {"name": "smoke pipeline", "project": pid, "type": "controller", "system_tags": ["hidden", "pipeline"]}, {}
        )["id"]
        server.set_status(task_id, "in_progress")
        server.set_status(task_id, status, status_message=message)
    return task_id


def _wait(server: Any, tmp_path: Path, project: str, pipeline_id: str = "") -> subprocess.CompletedProcess[str]:
    (tmp_path / "clearml.conf").write_text("sdk.development.report_use_subprocess: false\n")
    env = _smoke_env(
        tmp_path, **server.env(), CLEARML_CONFIG_FILE=str(tmp_path / "clearml.conf"), PROJECT=project,
        TIMEOUT="20", POLL_SECONDS="0.2", PIPELINE_ID=pipeline_id,
    )  # fmt: skip
    return _source_smoke("wait_for_pipeline", env)


def test_smoke_wait_finds_the_controller_in_its_hidden_subproject(tmp_path: Path, fake_clearml: Any) -> None:
    project = "d2ops/cluster-smoke/20260101-000000"
    _controller(fake_clearml, "d2ops/cluster-smoke/other-run", "failed")  # another run's: never taken
    task_id = _controller(fake_clearml, project, "completed")
    done = _wait(fake_clearml, tmp_path, project)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"pipeline controller {task_id} in project {project}/.pipelines/smoke pipeline" in done.stdout
    assert f"pipeline {task_id}: completed" in done.stdout and "pipeline completed:" in done.stdout
    gets = [body for endpoint, body in fake_clearml.calls if endpoint == "tasks.get_all" and body.get("type")]
    assert gets and all(b.get("include_subprojects") and b.get("search_hidden") for b in gets)
    assert not fake_clearml.unknown_calls


def test_smoke_wait_reports_a_failed_pipeline_by_the_launched_id(tmp_path: Path, fake_clearml: Any) -> None:
    project = "d2ops/cluster-smoke/20260101-000001"
    task_id = _controller(fake_clearml, project, "failed", message="train: CUDA out of memory")
    done = _wait(fake_clearml, tmp_path, project, pipeline_id=task_id)
    assert done.returncode == 1
    assert "[cluster-smoke] FAILED: pipeline ended 'failed' train: CUDA out of memory" in done.stderr
    assert not [body for endpoint, body in fake_clearml.calls if endpoint == "tasks.get_all" and body.get("type")]
