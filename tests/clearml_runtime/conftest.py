"""``clearml_server``: ClearML's SDK, for real, connected to an in-memory API server on 127.0.0.1.

The SDK keeps process-wide state (its default session, the server's API level on the
``Session`` class, the main task, offline mode, cached configuration). The fixture resets each
of those to "never connected" before the test, through ``monkeypatch`` so the previous values
come back afterwards, and closes any task the test left open while the server is still up.
Other tests in the process that use offline mode are therefore unaffected.

Usage::

    def test_something(clearml_server):
        from clearml import Task
        clearml_server.create_queue("gpu")            # queues must exist, as on a real server
        task = Task.create(project_name="proj", task_name="train")
        Task.enqueue(task, queue_name="gpu")
        task_id = clearml_server.next_queued("gpu")   # the agent takes it off the queue...
        clearml_server.start_task(task_id)           # ...and starts it (sets ``started``)
        clearml_server.agent_process_exited(task_id, 0)   # the process exited 0: completed
        assert clearml_server.tasks[task_id]["status"] == "completed"
        assert not clearml_server.unknown_calls

Or let a :class:`~.fake_server.FakeAgent` thread do the agent's part for every queued task.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .fake_server import FakeClearmlServer

#: Environment variables that would make the SDK run offline, as an agent's child, or elsewhere.
_CLEARML_ENV_TO_CLEAR = (
    "CLEARML_OFFLINE_MODE",
    "TRAINS_OFFLINE_MODE",
    "CLEARML_TASK_ID",
    "TRAINS_TASK_ID",
    "CLEARML_PROC_MASTER_ID",
    "TRAINS_PROC_MASTER_ID",
    "CLEARML_AUTH_TOKEN",
    "CLEARML_WORKER_ID",
    "CLEARML_WORKER_NAME",
    "CLEARML_DEFAULT_OUTPUT_URI",
    "CLEARML_API_DEFAULT_REQ_METHOD",
    "CLEARML_SET_ITERATION_OFFSET",
    "CLEARML_LOG_ENVIRONMENT",
    "TRAINS_API_HOST",
    "TRAINS_API_ACCESS_KEY",
    "TRAINS_API_SECRET_KEY",
    "TRAINS_WEB_HOST",
    "TRAINS_FILES_HOST",
    "TRAINS_CONFIG_FILE",
)

_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGSEGV", "SIGABRT", "SIGILL", "SIGFPE", "SIGQUIT")
    if hasattr(signal, name)
)


def reset_clearml_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ClearML's SDK behave as in a fresh process that has not connected anywhere yet.

    Every change goes through ``monkeypatch``, so the previous process state (e.g. offline
    mode set by another test) is restored at teardown. Touches these ClearML internals:

    * ``InterfaceBase._default_session`` (the session every backend object uses) -> None;
    * ``InterfaceBase._offline_mode`` / ``Session._offline_mode`` -> False (what
      ``Task.set_offline(False)`` sets, without its "current task not closed" check);
    * ``Session.api_version``, ``max_api_version``, ``server_version``, ``feature_set``,
      ``_sessions_created``, ``_client``, ``client``: class attributes the first login
      overwrites with the server's API level (``Session._connect``);
    * ``Task._Task__main_task`` / ``_Task__forked_proc_main_pid`` / ``_Task__exit_hook``: the
      process's main task and its atexit/signal hook object (a fresh one per test);
    * ``Task._report_subprocess_enabled`` -> False: reports go through a thread, not a forked
      reporter process (as d2ops's ``enable_offline`` does);
    * ``clearml.config._running_remotely_task_id`` -> None: not running under an agent;
    * ``ConfigWrapper._config`` / ``ConfigSDKWrapper._config_sdk`` -> None: the configuration is
      re-read from ``CLEARML_CONFIG_FILE`` (the fixture's empty file);
    * ``_HttpDriver._file_server_hosts`` -> None: the files hosts, cached on the first upload; an earlier
      test's server left there makes uploads to this one's files host go to its root instead;
    * ``PipelineController._pipeline_as_sub_project_cached`` (and on every subclass) ->
      None: the controller caches "server API >= 2.17" once per process; an online answer left
      behind breaks offline controllers later (``query_tasks`` with ``project=[None]``).
    """
    import clearml.config
    import clearml.config.remote
    from clearml import Task
    from clearml.automation.controller import PipelineController
    from clearml.backend_api.session import Session
    from clearml.backend_interface.base import InterfaceBase
    from clearml.config import ConfigSDKWrapper, ConfigWrapper
    from clearml.storage.helper import _HttpDriver

    monkeypatch.setattr(InterfaceBase, "_default_session", None)
    monkeypatch.setattr(InterfaceBase, "_offline_mode", False)
    monkeypatch.setattr(Session, "_offline_mode", False)
    monkeypatch.setattr(Session, "api_version", "2.9")
    monkeypatch.setattr(Session, "max_api_version", "2.9")
    monkeypatch.setattr(Session, "server_version", "1.0.0")
    monkeypatch.setattr(Session, "feature_set", "basic")
    monkeypatch.setattr(Session, "_sessions_created", 0)
    monkeypatch.setattr(Session, "_client", list(Session._client))
    monkeypatch.setattr(Session, "client", getattr(Session, "client", None), raising=False)
    monkeypatch.setattr(Task, "_Task__main_task", None)
    monkeypatch.setattr(Task, "_Task__forked_proc_main_pid", None)
    monkeypatch.setattr(Task, "_Task__exit_hook", None)
    monkeypatch.setattr(Task, "_report_subprocess_enabled", False, raising=False)
    monkeypatch.setattr(clearml.config, "_running_remotely_task_id", None)
    monkeypatch.setattr(clearml.config.remote, "running_remotely_task_id", None)
    monkeypatch.setattr(ConfigWrapper, "_config", None)
    monkeypatch.setattr(ConfigSDKWrapper, "_config_sdk", None)
    monkeypatch.setattr(_HttpDriver, "_file_server_hosts", None)
    # The cache is set on the class it is read from, so every subclass (d2ops's own controller too) keeps one.
    controllers = [PipelineController]
    while controllers:
        cls = controllers.pop()
        monkeypatch.setattr(cls, "_pipeline_as_sub_project_cached", None)
        controllers.extend(cls.__subclasses__())


def _close_leftover_main_task() -> None:
    from clearml import Task

    task = Task.current_task()
    if task is None:
        return
    try:
        task.close()
    except Exception as err:  # a failing test must not hide behind a teardown error
        print(f"clearml_server teardown: closing the leftover task failed: {err!r}")


@pytest.fixture
def clearml_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClearmlServer]:
    """A running :class:`FakeClearmlServer` that ClearML's SDK in this process is connected to."""
    server = FakeClearmlServer().start()
    conf = tmp_path / "clearml.conf"
    conf.write_text("")
    for name in _CLEARML_ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(conf))
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml_cache"))
    # ClearML's Task.init hooks these process-wide; put them back whatever the test did.
    saved_hooks = (sys.exit, sys.excepthook, sys.stdout, sys.stderr)
    saved_signals = {s: signal.getsignal(s) for s in _SIGNALS}
    reset_clearml_process_state(monkeypatch)
    try:
        yield server
    finally:
        _close_leftover_main_task()
        # The server stays up (a daemon thread): ClearML flushes reports of tasks a test opened at interpreter
        # exit, and against a stopped server it retries for ever, so pytest never exits.
        sys.exit, sys.excepthook, sys.stdout, sys.stderr = saved_hooks
        for sig, handler in saved_signals.items():
            if handler is not None:
                signal.signal(sig, handler)
