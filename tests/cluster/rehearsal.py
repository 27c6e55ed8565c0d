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
import os
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

#: the queues of configs/base/cluster.yaml (controller on services; steps on cpu and gpu)
SERVICES_QUEUE = "services"
STEP_QUEUES = ("cpu", "gpu")
#: the buckets docker/docker-compose.yml's minio-init creates
BUCKETS = ("datasets", "models", "clearml")

S3_KEY, S3_SECRET = "rehearsal-access-key", "rehearsal-secret-key"  # moto accepts any; a test-only pair

#: the SDK's own switches that would make a child run offline or as some other task
_ENV_TO_CLEAR = (
    "CLEARML_OFFLINE_MODE",
    "CLEARML_TASK_ID",
    "CLEARML_PROC_MASTER_ID",
    "CLEARML_WORKER_ID",
    "CLEARML_WORKER_NAME",
    "CLEARML_DEFAULT_OUTPUT_URI",
    "CLEARML_CONFIG_FILE",
    "CLEARML_CACHE_DIR",
    "PYTHONPATH",
)


def _conf(server: FakeClearmlServer, s3_host: str, extra: str = "") -> str:
    """A clearml.conf: the API server and the S3 endpoint's credentials (as clearml.conf.example has them)."""
    return f"""api {{
    api_server: "{server.url}"
    web_server: "{server.web_url}"
    files_server: "{server.files_url}"
    credentials {{access_key: "{server.access_key}", secret_key: "{server.secret_key}"}}
}}
sdk {{
    aws.s3.credentials: [{{host: "{s3_host}", key: "{S3_KEY}", secret: "{S3_SECRET}", multipart: false, secure: false}}]
    development.report_use_subprocess: false
}}
{extra}
"""


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

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
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
        parts = ["--- tasks", *tasks, f"--- unknown endpoints: {[e for e, _ in unknown]}"]
        for agent in self.agents:
            parts += [f"--- agent {agent.name} (exit {agent.process.poll()})", agent.tail()]
        return "\n".join(parts)

    def task_log(self, task_id: str) -> str:
        return "\n".join(self.server.log_lines(task_id))

    # ------------------------------------------------------------------ agents

    def start_agent(self, name: str, *args: str) -> Agent:
        """``clearml-agent daemon ... --foreground`` as the user starts it, in venv mode on this interpreter."""
        conf = self.root / f"{name}.conf"
        work = self.root / "agents" / name
        conf.write_text(
            _conf(
                self.server,
                self.s3_host,
                f"""agent {{
    venvs_dir: "{work}/venvs"
    vcs_cache {{ enabled: false, path: "{work}/vcs-cache" }}
    pip_download_cache {{ enabled: false, path: "{work}/pip-cache" }}
    venv_update.enabled: false
    docker_pip_cache: "{work}/pip-cache"
    docker_apt_cache: "{work}/apt-cache"
}}""",
            )
        )
        env = {k: v for k, v in os.environ.items() if k not in _ENV_TO_CLEAR}
        env.update(
            {
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
        (work / "home").mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        agent_bin = Path(sys.executable).with_name("clearml-agent")
        process = subprocess.Popen(
            [str(agent_bin), "daemon", *args, "--create-queue", "--foreground"],
            cwd=work,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
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


@contextlib.contextmanager
def rehearsal_cluster(root: Path) -> Iterator[Cluster]:
    """Server, S3, origin, laptop and the two agents of README's cluster, all on 127.0.0.1."""
    from d2ops.storage.local_s3 import local_s3_endpoint

    server = FakeClearmlServer().start()
    with local_s3_endpoint(in_process=False) as s3:
        origin, laptop = snapshot_repository(root)
        laptop_conf = root / "laptop.conf"
        laptop_conf.write_text(_conf(server, s3.host))
        env = {k: v for k, v in os.environ.items() if k not in _ENV_TO_CLEAR}
        env.update(server.env())
        env.update(
            {
                "CLEARML_CONFIG_FILE": str(laptop_conf),
                "CLEARML_CACHE_DIR": str(root / "laptop-cache"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        cluster = Cluster(root, server, s3.host, s3.endpoint_url, laptop, origin, env)
        client = cluster.s3_client()
        for bucket in BUCKETS:
            client.create_bucket(Bucket=bucket)
        try:
            cluster.start_agent("agent-services", "--services-mode", "--queue", SERVICES_QUEUE, "--cpu-only")
            cluster.start_agent("agent-steps", "--queue", *STEP_QUEUES, "--cpu-only")
            yield cluster
        finally:
            cluster.stop_agents()
            server.stop()
