"""An in-memory stand-in for the ClearML API server, speaking ClearML's REST protocol over real HTTP.

The project's rule is to replace the ClearML server only at the outermost boundary, behind the
SDK's ``Session``: everything else (``Task``, ``PipelineController``, ``ClearmlJob``, the
schedulers) is ClearML's own code, talking HTTP to this process over a real socket on
127.0.0.1.

Protocol (as the SDK 2.1.12 expects it, ``clearml/backend_api/session/session.py`` and
``response.py``, and as clearml-server answers it, ``apiserver/service_repo/apicall.py``
``APICall.get_response``):

* requests are ``GET`` (the SDK's default method) or ``POST`` to ``/[v<version>/]<service>.<action>``
  with a JSON body (``application/json-lines`` for batches such as ``events.add_batch``);
* replies are ``{"meta": {"id", "trx", "endpoint": {"name", "requested_version",
  "actual_version"}, "result_code", "result_subcode", "result_msg", "error_stack",
  "error_data"}, "data": {...}}``, with the HTTP status equal to ``result_code``;
* ``auth.login`` takes HTTP basic auth (access key / secret key) and returns a JWT whose claims
  carry ``api_version``, ``server_version`` and ``feature_set``: the SDK reads the API level
  from the token (``Session._connect``), there is no separate version header;
* every other call must carry ``Authorization: Bearer <token>``, else 401;
* an unknown endpoint gets 404 / subcode 0, "Unable to find endpoint for name ... and version
  ..." (``ServiceRepo._resolve_endpoint_from_call``), and is recorded in
  :attr:`FakeClearmlServer.unknown_calls` so a test can assert none were hit;
* datetimes are ISO 8601 with an explicit UTC offset (clearml-server's rapidjson encoder uses
  ``DM_ISO8601 | DM_NAIVE_IS_UTC``, ``apiserver/utilities/json.py``).

Task status changes follow clearml-server's rules (``apiserver/bll/task/utils.py``:
``ChangeStatusRequest``, ``validate_status_change`` and ``state_machine``), see
:func:`FakeClearmlServer._change_status`.

What it does NOT reproduce (deliberate simplifications):

* one company, one user, one set of credentials; no permissions, no public/example objects,
  no token expiry checks, no impersonation;
* no MongoDB: there are no atomic compare-and-set races to lose (one lock serialises every
  call), and no ``FailedChangingTaskStatus``; no text search (``search_text`` is ignored);
  ``_any_``/``_all_`` field queries take a pattern only (their datetime form is refused); no range/datetime
  filters (``last_update: [">=..."]``), no scroll ids (paging is ``page``/``page_size`` only);
* no Elasticsearch: events are kept in a list; plots, debug images and vectors are stored but
  not compressed or served; ``events.get_task_log`` ignores ``from_timestamp`` paging;
* no background watchdog: clearml-server's ``non_responsive_tasks_watchdog`` (which stops
  in_progress tasks that have not pinged for ``task_update_timeout`` seconds) never runs;
* no real agents: tests move tasks along with :meth:`FakeClearmlServer.start_task` /
  :meth:`complete_task` / :meth:`fail_task` (or :class:`FakeAgent`) instead of a worker
  polling ``queues.get_next_task``; ``workers.*`` only lists workers registered by the test;
* ``tasks.stop`` always stops at once (real servers only set ``status_message="stopping"``
  for a task run by a live worker and let the worker report ``stopped``);
* models are records only: ``models.set_ready`` and ``tasks.publish`` set ``ready``; nothing is uploaded
  to a files server except what the SDK POSTs to ``/files/`` (kept in :attr:`files`);
* project stats, project hierarchy moves/merges, reports, datasets' own services, vaults,
  ``users`` preferences and the serving service are absent (unknown-endpoint errors);
* the many-task variants (``tasks.*_many``) exist only for ``archive_many``; ``tasks.delete``
  does not delete artifacts/models or child tasks; ``tasks.reset`` deletes the task's events but
  reports no deleted files; ``last_metrics`` keeps value/min/max/first/mean/count but not
  ``metric_stats``/``unique_metrics``; ``events.scalar_metrics_iter_histogram`` supports only
  ``key="iter"``; the files host accepts multipart POSTs and plain GETs only (no DELETE);
* replies follow clearml-server's code, even where the SDK's own response models disagree: e.g.
  ``tasks.get_configuration_names`` returns a list of ``{"task", "names"}`` (as
  ``services/tasks.py`` does), which the SDK 2.1.12 ``APIClient`` refuses because its schema
  says an object. Such a call fails here as it would against a real server.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt

#: ``apiserver/bll/event/event_common.py``: the iteration single values are reported at.
SINGLE_SCALAR_ITERATION = -(2**31)

#: clearml-server 2.3 (``apiserver/version.py``) serves API 2.34 (``documentation/api_versions.md``).
SERVER_VERSION = "2.3.0"
API_VERSION = "2.34"

#: Endpoints clients call that the open-source clearml-server does not have (git grep of its ``apiserver/``
#: at 0b769d4 finds no ``runtime_properties``; they exist only in ClearML's hosted/enterprise servers). It
#: answers them as any unknown endpoint (404); clearml-agent's ``Worker.get_runtime_properties`` /
#: ``set_runtime_properties`` catch that and stop asking. Every other unknown endpoint is a gap in this
#: stand-in and lands in :attr:`FakeClearmlServer.unknown_calls`.
ABSENT_FROM_OPEN_SOURCE_SERVER = frozenset({"workers.get_runtime_properties", "workers.set_runtime_properties"})

#: Endpoints clearml-server answers without a token: ``auth.login`` checks its own credentials, and
#: ``apiserver/schema/services/debug.conf`` gives ``ping`` ``authorize: false`` (compose health checks use it).
UNAUTHORIZED_ENDPOINTS = frozenset({"auth.login", "debug.ping"})

ACCESS_KEY = "FAKEACCESSKEY"
SECRET_KEY = "fake-secret-key"  # a test credential for a server that only exists in tests

#: ``apiserver/database/model/task/task.py`` ``TaskStatus``.
STATUSES = ("created", "queued", "in_progress", "stopped", "publishing", "published", "closed", "failed", "completed")

#: ``apiserver/bll/task/utils.py`` ``state_machine``: allowed ``current -> new`` status changes.
STATE_MACHINE: dict[str, frozenset[str]] = {
    "created": frozenset({"queued", "in_progress"}),
    "queued": frozenset({"created", "in_progress", "stopped"}),
    "in_progress": frozenset({"stopped", "failed", "created", "completed"}),
    "stopped": frozenset(
        {"closed", "created", "failed", "queued", "in_progress", "published", "publishing", "completed"}
    ),
    "closed": frozenset({"created", "failed", "published", "publishing", "stopped"}),
    "failed": frozenset({"created", "stopped", "published", "queued"}),
    "publishing": frozenset({"published"}),
    "published": frozenset(),
    "completed": frozenset({"published", "in_progress", "created"}),
}

#: ``apiserver/services/tasks.py`` ``create_fields``: what ``tasks.create``/``tasks.edit`` accept.
TASK_CREATE_FIELDS = (
    "name",
    "tags",
    "system_tags",
    "type",
    "error",
    "comment",
    "parent",
    "project",
    "input",
    "models",
    "container",
    "output_dest",
    "execution",
    "hyperparams",
    "configuration",
    "script",
    "runtime",
)
#: Embedded documents that ``tasks.edit`` merges key by key instead of replacing
#: (``services/tasks.py`` ``edit``: ``d = field.to_mongo(); d.update(value)``).
TASK_EMBEDDED_FIELDS = ("execution", "script", "output", "models")
#: ``Task`` fields with ``user_set_allowed=True`` plus what ``prepare_update_fields`` adds.
TASK_UPDATE_FIELDS = (
    "name",
    "comment",
    "created",
    "project",
    "tags",
    "system_tags",
    "status",
    "status_reason",
    "status_message",
    "output__error",
)
TASK_TYPES = (
    "training",
    "testing",
    "inference",
    "data_processing",
    "application",
    "monitor",
    "controller",
    "report",
    "optimizer",
    "service",
    "qc",
    "custom",
)


class ApiError(Exception):
    """An error reply: HTTP status = ``code``, ``meta.result_subcode`` = ``subcode``.

    Codes and subcodes are those of ``apiserver/apierrors/errors.conf``.
    """

    def __init__(self, code: int, subcode: int, msg: str, **error_data: Any) -> None:
        super().__init__(f"{code}/{subcode}: {msg}")
        self.code = code
        self.subcode = subcode
        self.msg = msg
        self.error_data = error_data


def invalid_task_id(**data: Any) -> ApiError:
    return ApiError(400, 101, f"Invalid task id: {data}", **data)


def invalid_task_status(msg: str = "Invalid task status", **data: Any) -> ApiError:
    return ApiError(400, 110, f"{msg}: {data}", **data)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _new_id() -> str:
    return uuid.uuid4().hex


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _md5(text: str) -> str:
    """``apiserver/database/utils.py`` ``hash_field_name``."""
    return hashlib.md5(text.encode()).hexdigest()  # a key, not security


def _get_path(doc: dict, path: str) -> Any:
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _set_path(doc: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    cur = doc
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value


def _project(doc: dict, only_fields: list[str] | None) -> dict:
    """``only_fields`` projection (``id`` is always returned, as by MongoDB)."""
    if not only_fields:
        return copy.deepcopy(doc)
    out: dict = {"id": doc.get("id")}
    for field in only_fields:
        value = _get_path(doc, field)
        if value is not None:
            _set_path(out, field, copy.deepcopy(value))
    return out


def _list_field_match(values: Any, terms: Any) -> bool:
    """One list-field condition as clearml-server's ``GetMixin.get_list_field_query`` builds it.

    Plain values are OR-ed (``$in``), ``-value`` and ``__$not value`` exclude (``$nin``),
    ``__$all``/``__$and`` switch the following values to AND, ``__$any``/``__$or`` back to OR,
    ``None`` also accepts an empty/missing field.
    """
    if not isinstance(terms, (list, tuple)):
        terms = [terms]
    have = set(values) if isinstance(values, (list, tuple)) else ({values} if values is not None else set())
    context = "or"
    negate_next = False
    any_of: list[str] = []
    all_of: list[str] = []
    none_of: list[str] = []
    allow_empty = False
    for term in terms:
        if term is None:
            allow_empty = True
            continue
        term = str(term)
        if term in ("__$all", "__$and"):
            context = "and"
            continue
        if term in ("__$any", "__$or"):
            context = "or"
            continue
        if term == "__$nop":
            context = "or"
            continue
        if term == "__$not":
            negate_next = True
            continue
        if negate_next or (term.startswith("-") and len(term) > 1):
            none_of.append(term if negate_next else term[1:])
            negate_next = False
            continue
        (all_of if context == "and" else any_of).append(term)
    ok = True
    if any_of:
        ok = ok and bool(have.intersection(any_of))
    if all_of:
        ok = ok and set(all_of) <= have
    if none_of:
        ok = ok and not have.intersection(none_of)
    if allow_empty and not have:
        return True
    return ok


def _fields_match(doc: dict, query: dict, combine: Callable[[Iterable[bool]], bool]) -> bool:
    """``_any_``/``_all_`` ``{fields, pattern}``: ``GetMixin._prepare_query_no_company``
    (``apiserver/database/model/base.py``) matches each field against the pattern as a case-insensitive regex
    (a missing field does not match) and ORs (``_any_``) or ANDs (``_all_``) the results. ClearML's step cache
    (``ClearmlJob._get_cached_task``) finds a finished step by ``_all_`` on ``runtime._job_hash``. The
    ``datetime`` form is not supported: it fails loudly rather than match everything."""
    if query.get("datetime") is not None or not query.get("pattern"):
        raise ApiError(400, 12, f"fake server: unsupported _any_/_all_ query {query!r}")
    regex = re.compile(query["pattern"], re.IGNORECASE)

    def matches(field: str) -> bool:
        value = _get_path(doc, field)
        return value is not None and bool(regex.search(str(value)))

    return combine(matches(field) for field in query.get("fields") or [])


def _filter(
    docs: Iterable[dict],
    body: dict,
    *,
    list_fields: Iterable[str],
    pattern_fields: Iterable[str] = ("name",),
    hidden_filter: bool = True,
) -> list[dict]:
    """Filter, order and page documents the way ``GetMixin.get_many`` does (a subset of it)."""
    out = []
    ids = body.get("id")
    for doc in docs:
        if hidden_filter and not body.get("search_hidden") and not ids and "hidden" in (doc.get("system_tags") or []):
            continue
        ok = True
        for field in pattern_fields:
            pattern = body.get(field)
            if pattern and not re.search(pattern, str(doc.get(field) or "")):
                ok = False
        for key, combine in (("_any_", any), ("_all_", all)):
            if ok and body.get(key):
                ok = _fields_match(doc, body[key], combine)
        for field in list_fields:
            if field.endswith("*"):
                prefix = field[:-1]
                keys = [k for k in body if k.startswith(prefix)]
            else:
                keys = [field] if field in body else []
            for key in keys:
                terms = body[key]
                if terms is None or terms == []:
                    continue
                if not _list_field_match(_get_path(doc, key), terms):
                    ok = False
        if ok:
            out.append(doc)
    for order in reversed(body.get("order_by") or []):
        desc = order.startswith("-")
        key = order.lstrip("-")

        def sort_key(d: dict, key: str = key) -> tuple:
            v = _get_path(d, key)
            return (v is not None, v if not isinstance(v, datetime) else v.timestamp())

        try:
            out.sort(key=sort_key, reverse=desc)
        except TypeError:
            out.sort(key=lambda d, key=key: str(_get_path(d, key)), reverse=desc)
    page_size = body.get("page_size")
    if page_size:
        page = body.get("page") or 0
        out = out[page * page_size : (page + 1) * page_size]
    elif body.get("size"):
        out = out[: body["size"]]
    return out


def _hyperparams_list(hyperparams: dict) -> list[dict]:
    """``HyperParams._get_params_list``: every item of every section, sorted by (section, name)."""
    items = [item for section in (hyperparams or {}).values() for item in section.values()]
    return [copy.deepcopy(i) for i in sorted(items, key=lambda p: (p.get("section", ""), p.get("name", "")))]


def _hyperparams_from_list(items: Iterable[dict]) -> dict[str, dict[str, dict]]:
    """``HyperParams._db_dicts_from_list``: items bucketed by section, then by name."""
    out: dict[str, dict[str, dict]] = {}
    for item in items:
        clean = {k: item.get(k) for k in ("section", "name", "value", "type", "description") if item.get(k) is not None}
        if "value" not in clean:
            clean["value"] = ""
        out.setdefault(item["section"], {})[item["name"]] = clean
    return out


class FakeClearmlServer:
    """The ClearML API served from memory. Start it with :meth:`start`, stop it with :meth:`stop`.

    State a test can read or change (hold :attr:`lock` while changing it by hand):

    * :attr:`tasks`, :attr:`projects`, :attr:`queues`, :attr:`models`: documents by id, in
      clearml-server's stored shape (``hyperparams`` as section -> name -> item, ``configuration``
      as name -> item, datetimes as aware ``datetime``);
    * :attr:`events`: every event accepted by ``events.add``/``events.add_batch``;
    * :attr:`calls`: ``(endpoint, body)`` for every request, in arrival order;
    * :attr:`unknown_calls`: ``(endpoint, body)`` of requests to endpoints this stand-in lacks;
    * :attr:`errors`: ``(endpoint, body, ApiError)`` of every request answered with an error.

    The agent's side: :meth:`start_task`, :meth:`complete_task`, :meth:`fail_task`,
    :meth:`stop_task`, :meth:`set_status` and :meth:`next_queued`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        api_version: str = API_VERSION,
        server_version: str = SERVER_VERSION,
    ) -> None:
        self.host = host
        self.port = port
        self.access_key = access_key
        self.secret_key = secret_key
        self.api_version = api_version
        self.server_version = server_version
        self._token_secret = uuid.uuid4().hex
        #: access key -> secret key of every identity that logs in (one user, as everywhere here); more come
        #: from :meth:`add_credentials` (a server seeded with fixed users) and ``auth.create_credentials``
        self.credentials: dict[str, str] = {access_key: secret_key}
        self.lock = threading.RLock()
        self.user = {"id": "fake-user", "name": "Fake User", "company": "fake-company"}
        self.tasks: dict[str, dict] = {}
        self.projects: dict[str, dict] = {}
        self.queues: dict[str, dict] = {}
        self.models: dict[str, dict] = {}
        self.workers: dict[str, dict] = {}
        self.events: list[dict] = []
        self._event_keys: dict[str, int] = {}
        self.files: dict[str, bytes] = {}
        self.calls: list[tuple[str, Any]] = []
        self.unknown_calls: list[tuple[str, Any]] = []
        #: calls to :data:`ABSENT_FROM_OPEN_SOURCE_SERVER`: answered 404 like clearml-server, not counted as unknown
        self.absent_calls: list[tuple[str, Any]] = []
        self.errors: list[tuple[str, Any, ApiError]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # clearml-server creates a queue tagged "default" on first start (``apiserver/mongo/initialize``)
        self.create_queue("default", system_tags=["default"])
        #: clearml-server's ``apiserver.workers.task_update_timeout`` (``stop_task``'s live-worker check)
        self.task_update_timeout = 600.0
        self._handlers: dict[str, Callable[[dict, dict], Any]] = {
            name[len("ep_") :].replace("__", "."): getattr(self, name) for name in dir(self) if name.startswith("ep_")
        }

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def files_url(self) -> str:
        return f"{self.url}/files"

    @property
    def web_url(self) -> str:
        return f"{self.url}/webapp"

    def start(self) -> FakeClearmlServer:
        server = self

        class Handler(_Handler):
            fake = server

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-clearml-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeClearmlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The environment variables that point ClearML's SDK at this server."""
        return {
            "CLEARML_API_HOST": self.url,
            "CLEARML_WEB_HOST": self.web_url,
            "CLEARML_FILES_HOST": self.files_url,
            "CLEARML_API_ACCESS_KEY": self.access_key,
            "CLEARML_API_SECRET_KEY": self.secret_key,
        }

    # ------------------------------------------------------------------ dispatch

    def endpoints(self) -> list[str]:
        return sorted(self._handlers)

    def dispatch(self, endpoint: str, version: str | None, body: Any, headers: dict[str, str]) -> tuple[int, dict]:
        """Answer one call; returns (HTTP status, reply document)."""
        with self.lock:
            self.calls.append((endpoint, body))
        meta = {
            "id": _new_id(),
            "trx": _new_id(),
            "endpoint": {
                "name": endpoint,
                "requested_version": version or self.api_version,
                "actual_version": version or self.api_version,
            },
            "result_code": 200,
            "result_subcode": 0,
            "result_msg": "OK",
            "error_stack": None,
            "error_data": {},
        }
        try:
            handler = self._handlers.get(endpoint)
            if handler is None and endpoint in ABSENT_FROM_OPEN_SOURCE_SERVER:
                # answered as clearml-server answers it; the caller is expected to cope (and does)
                with self.lock:
                    self.absent_calls.append((endpoint, body))
                raise ApiError(
                    404, 0, f"Unable to find endpoint for name {endpoint} and version {version or self.api_version}"
                )
            if handler is None:
                with self.lock:
                    self.unknown_calls.append((endpoint, body))
                print(f"!!! fake ClearML server: UNKNOWN ENDPOINT {endpoint} body={str(body)[:300]}")
                raise ApiError(
                    404, 0, f"Unable to find endpoint for name {endpoint} and version {version or self.api_version}"
                )
            if endpoint not in UNAUTHORIZED_ENDPOINTS:
                self._check_token(headers)
            with self.lock:
                data = handler(body if body is not None else {}, headers)
            return 200, {"meta": meta, "data": data if data is not None else {}}
        except Exception as exc:
            err = exc if isinstance(exc, ApiError) else ApiError(500, 0, f"fake server: {exc!r}")
            if not isinstance(exc, ApiError):
                import traceback

                traceback.print_exc()
                meta["error_stack"] = traceback.format_exc()
            with self.lock:
                self.errors.append((endpoint, body, err))
            meta.update(result_code=err.code, result_subcode=err.subcode, result_msg=err.msg, error_data=err.error_data)
            return err.code, {"meta": meta, "data": {}}

    def _check_token(self, headers: dict[str, str]) -> None:
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise ApiError(401, 20, "Unauthorized (missing credentials)")
        try:
            jwt.decode(auth.split(" ", 1)[1], self._token_secret, algorithms=["HS256"])
        except jwt.PyJWTError as err:
            raise ApiError(401, 30, f"Invalid token: {err}") from None

    # ------------------------------------------------------------------ helpers for tests (the agent / the server)

    def task(self, task_id: str) -> dict:
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                raise invalid_task_id(id=task_id)
            return task

    def queue_by_name(self, name: str) -> dict:
        with self.lock:
            for queue in self.queues.values():
                if queue["name"] == name:
                    return queue
        raise KeyError(f"no queue named {name!r}")

    def create_queue(self, name: str, *, system_tags: list[str] | None = None, tags: list[str] | None = None) -> str:
        with self.lock:
            now = _now()
            queue_id = _new_id()
            self.queues[queue_id] = {
                "id": queue_id,
                "name": name,
                "display_name": name,
                "user": self.user["id"],
                "company": self.user["company"],
                "created": now,
                "last_update": now,
                "tags": list(tags or []),
                "system_tags": list(system_tags or []),
                "entries": [],
                "metadata": {},
            }
            return queue_id

    def queued_task_ids(self, queue_name: str) -> list[str]:
        with self.lock:
            return [e["task"] for e in self.queue_by_name(queue_name)["entries"]]

    def next_queued(self, queue_name: str | None = None) -> str | None:
        """Pop the first task of a queue (or of any queue), as ``queues.get_next_task`` does for an agent."""
        with self.lock:
            queues = [self.queue_by_name(queue_name)] if queue_name else list(self.queues.values())
            for queue in queues:
                if queue["entries"]:
                    entry = queue["entries"].pop(0)
                    queue["last_update"] = _now()
                    return entry["task"]
            return None

    def register_worker(self, worker: str, queues: Iterable[str] = ("default",)) -> None:
        """Make a worker visible to ``workers.get_all`` (e.g. so a queue counts as watched)."""
        with self.lock:
            ids = [self.queue_by_name(q)["id"] for q in queues]
            self.workers[worker] = {
                "id": worker,
                "user": {"id": self.user["id"], "name": self.user["name"]},
                "company": {"id": self.user["company"]},
                "register_time": _now(),
                "last_activity_time": _now(),
                "last_report_time": _now(),
                "queues": [{"id": q, "name": self.queues[q]["name"]} for q in ids],
                "task": None,
            }

    def set_status(
        self,
        task_id: str,
        status: str,
        *,
        force: bool = True,
        status_reason: str = "",
        status_message: str = "",
    ) -> dict:
        """Move a task to ``status`` as the server would, by the endpoint that sets it.

        ``in_progress`` goes through ``tasks.started`` (sets ``started``), ``completed``
        through ``tasks.completed``, ``failed`` through ``tasks.failed``, ``stopped`` through
        ``tasks.stopped`` (all set ``completed``); anything else is a plain
        ``ChangeStatusRequest``. ``force`` defaults to True (an agent's view); pass
        ``force=False`` to have the state machine enforced.
        """
        body = {"task": task_id, "force": force, "status_reason": status_reason, "status_message": status_message}
        with self.lock:
            if status == "in_progress":
                return self.ep_tasks__started(body, {})
            if status == "completed":
                return self.ep_tasks__completed(body, {})
            if status == "failed":
                return self.ep_tasks__failed(body, {})
            if status == "stopped":
                return self.ep_tasks__stopped(body, {})
            if status == "queued":
                return self.ep_tasks__enqueue(body, {})
            return self._change_status(
                self.task(task_id), status, status_reason=status_reason, status_message=status_message, force=force
            )

    def start_task(self, task_id: str, worker: str = "fake-agent") -> dict:
        """What clearml-agent does when it takes a task: off its queue, then ``tasks.started``.

        As ``clearml_agent/commands/worker.py`` (``Worker.run_one_task``/``execute``) sends it:
        ``force=True``, ``status_reason="worker started execution"``, ``status_message="Changed by
        clearml-agent <worker>"``. The server sets ``started`` (see ``ep_tasks__started``).
        """
        with self.lock:
            task = self.task(task_id)
            self._remove_from_queues(task_id)
            task["last_worker"] = worker
            task["last_worker_report"] = _now()
            return self.ep_tasks__started(
                {
                    "task": task_id,
                    "force": True,
                    "status_reason": "worker started execution",
                    "status_message": f"Changed by clearml-agent {worker}",
                },
                {},
            )

    def agent_process_exited(self, task_id: str, exit_code: int, worker: str = "fake-agent") -> dict:
        """What clearml-agent reports when a task's process ends
        (``clearml_agent/commands/worker.py`` ``Worker.handle_task_process_termination``).

        0: ``tasks.completed`` (``status_reason="worker execution done"``); -2 or 254
        (interrupted): ``tasks.stopped`` (``"user abort"``); anything else: ``tasks.failed``
        (``"worker execution exit code <n>"``). None of them forced, so a task the process already
        moved on (e.g. failed) is refused by the state machine and left as it is, as with a
        real agent (which only logs the refusal).

        Note that an SDK process running under an agent (``CLEARML_TASK_ID`` set) does not mark its
        own task completed on exit (``Task.__shutdown``: "if we are running remotely, the daemon
        will take care of it"): a test playing the agent must call this.
        """
        body = {"task": task_id, "status_message": f"Changed by clearml-agent {worker}"}
        with self.lock:
            try:
                if exit_code == 0:
                    return self.ep_tasks__completed({**body, "status_reason": "worker execution done"}, {})
                if exit_code in (-2, 254):
                    return self.ep_tasks__stopped({**body, "status_reason": "user abort"}, {})
                return self.ep_tasks__failed({**body, "status_reason": f"worker execution exit code {exit_code}"}, {})
            except ApiError as err:
                self.errors.append(("agent_process_exited", body, err))
                return {"updated": 0}

    def complete_task(self, task_id: str, *, status_message: str = "") -> dict:
        """``tasks.completed`` without force (the task must be in_progress or stopped)."""
        with self.lock:
            return self.ep_tasks__completed({"task": task_id, "status_message": status_message}, {})

    def fail_task(self, task_id: str, status_reason: str = "fake agent failure", *, force: bool = False) -> dict:
        """``tasks.failed`` (the task must be in_progress, stopped or closed, unless ``force``)."""
        with self.lock:
            return self.ep_tasks__failed({"task": task_id, "status_reason": status_reason, "force": force}, {})

    def stop_task(self, task_id: str, status_reason: str = "aborted", *, force: bool = False) -> dict:
        with self.lock:
            return self.ep_tasks__stopped({"task": task_id, "status_reason": status_reason, "force": force}, {})

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
        """Poll ``predicate`` (under the lock) until it returns a truthy value; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(interval)

    def scalars(self, task_id: str) -> list[dict]:
        """Scalar events of a task (single values included, at iteration -2**31)."""
        with self.lock:
            return [e for e in self.events if e.get("task") == task_id and e.get("type") == "training_stats_scalar"]

    def single_values(self, task_id: str) -> dict[str, float]:
        """``{variant: value}`` of the single values a task reported (``Logger.report_single_value``)."""
        return {e["variant"]: e["value"] for e in self.scalars(task_id) if e.get("iter") == SINGLE_SCALAR_ITERATION}

    def log_lines(self, task_id: str) -> list[str]:
        with self.lock:
            return [e.get("msg", "") for e in self.events if e.get("task") == task_id and e.get("type") == "log"]

    def hyperparams(self, task_id: str) -> dict[str, dict[str, str]]:
        """``{section: {name: value}}`` of a task's hyperparameters."""
        with self.lock:
            return {
                section: {name: item.get("value") for name, item in items.items()}
                for section, items in (self.task(task_id).get("hyperparams") or {}).items()
            }

    def endpoint_calls(self, endpoint: str) -> list[Any]:
        with self.lock:
            return [body for name, body in self.calls if name == endpoint]

    # ------------------------------------------------------------------ core rules

    def _change_status(
        self,
        task: dict,
        new_status: str,
        *,
        status_reason: str = "",
        status_message: str = "",
        force: bool = False,
        allow_same_state_transition: bool = True,
        current_status_override: str | None = None,
        **fields: Any,
    ) -> dict:
        """``apiserver/bll/task/utils.py`` ``ChangeStatusRequest.execute`` / ``validate_transition``.

        Without ``force`` the change must be allowed by ``state_machine`` (a same-status change is
        allowed unless ``allow_same_state_transition`` is False). Sets ``status``,
        ``status_reason``, ``status_message`` (to what was passed, empty by default, as the real
        server does), ``status_changed``, ``last_update``, ``last_change``; going to ``queued``
        drops the ``development`` system tag. ``fields`` are extra updates; a value of
        ``_UNSET`` removes the field, ``_MIN`` keeps the smaller of old and new.
        Returns ``{"updated": 1, "fields": {...}}`` like the real call.
        """
        if new_status not in STATUSES:
            raise ApiError(400, 12, f"Validation error: invalid status {new_status}")
        current = current_status_override or task["status"]
        if not force:
            if new_status != current:
                if new_status not in STATE_MACHINE[current]:
                    raise invalid_task_status(
                        "Invalid status change", current_status=current, new_status=new_status, task=task["id"]
                    )
            elif not allow_same_state_transition:
                raise invalid_task_status(
                    "Task already in requested status", current_status=current, new_status=new_status
                )
        now = _now()
        update = {
            "status": new_status,
            "status_reason": status_reason or "",
            "status_message": status_message or "",
            "status_changed": now,
            "last_update": now,
            "last_change": now,
            "last_changed_by": self.user["id"],
        }
        task.update(update)
        if new_status == "queued":
            task["system_tags"] = [t for t in task.get("system_tags") or [] if t != "development"]
        for key, value in fields.items():
            if value is _UNSET:
                task.pop(key, None)
            elif isinstance(value, _Min):
                old = task.get(key)
                task[key] = value.value if old is None else min(old, value.value)
            else:
                task[key] = value
                update[key] = value
        return {"updated": 1, "fields": copy.deepcopy(update)}

    def _remove_from_queues(self, task_id: str, exclude: str | None = None) -> int:
        """``TaskBLL.remove_task_from_all_queues``."""
        removed = 0
        for queue in self.queues.values():
            if queue["id"] == exclude:
                continue
            before = len(queue["entries"])
            queue["entries"] = [e for e in queue["entries"] if e["task"] != task_id]
            if len(queue["entries"]) != before:
                removed += 1
                queue["last_update"] = _now()
        return removed

    def _dequeue_and_change_status(
        self,
        task: dict,
        *,
        status_reason: str = "",
        status_message: str = "",
        new_status: str | None = None,
        new_status_for_aborted_task: str | None = None,
    ) -> dict:
        """``TaskBLL.dequeue_and_change_status`` (``apiserver/bll/task/task_bll.py``)."""
        self._remove_from_queues(task["id"])
        if task["status"] not in ("queued", "in_progress"):
            return {"updated": 0}
        if new_status_for_aborted_task and task["status"] == "in_progress":
            new_status = new_status_for_aborted_task
        return self._change_status(
            task,
            new_status or task.get("enqueue_status") or "created",
            status_reason=status_reason,
            status_message=status_message,
            force=True,
            enqueue_status=_UNSET,
        )

    def _task_for_update(self, task_id: str, *, force: bool = False, allow_all_statuses: bool = False) -> dict:
        """``apiserver/bll/task/utils.py`` ``get_task_for_update``: created only, or created/queued/in_progress
        with ``force``."""
        task = self.task(task_id)
        if allow_all_statuses:
            return task
        allowed = ["created"] + (["queued", "in_progress"] if force else [])
        if task["status"] not in allowed:
            raise invalid_task_status(expected="created", status=task["status"], task=task_id)
        return task

    def _touch(self, task: dict, set_last_update: bool = True) -> None:
        """``apiserver/bll/task/utils.py`` ``update_task``."""
        now = _now()
        task["last_change"] = now
        task["last_changed_by"] = self.user["id"]
        if set_last_update:
            task["last_update"] = now

    def _project_id(self, project: str | None) -> str | None:
        if project and project not in self.projects:
            raise ApiError(400, 401, f"Invalid project id: {project}", id=project)
        return project

    def _ensure_project(self, name: str, **params: Any) -> str | None:
        """``apiserver/bll/project/sub_projects.py`` ``_ensure_project``: find or create, parents first."""
        name = name.strip("/")
        if not name:
            return None
        for project in self.projects.values():
            if project["name"] == name:
                return project["id"]
        location, _, basename = name.rpartition("/")
        parent = self._ensure_project(location) if location else None
        now = _now()
        project_id = _new_id()
        self.projects[project_id] = {
            "id": project_id,
            "name": name,
            "basename": basename,
            "description": params.get("description", ""),
            "tags": list(params.get("tags") or []),
            "system_tags": list(params.get("system_tags") or []),
            "default_output_destination": params.get("default_output_destination"),
            "user": self.user["id"],
            "company": self.user["company"],
            "created": now,
            "last_update": now,
            "parent": parent,
        }
        return project_id

    def _task_out(self, task: dict, only_fields: list[str] | None = None) -> dict:
        """A task as the API returns it (``conform_task_data``): artifacts as a list sorted by key."""
        doc = copy.deepcopy(task)
        artifacts = (doc.get("execution") or {}).get("artifacts")
        if isinstance(artifacts, dict):
            doc["execution"]["artifacts"] = sorted(artifacts.values(), key=lambda a: a.get("key", ""))
        doc.pop("enqueue_status", None)  # exclude_by_default=True
        return _project(doc, only_fields)

    # ------------------------------------------------------------------ auth / server / users

    def ep_auth__login(self, body: dict, headers: dict[str, str]) -> dict:
        """``apiserver/services/auth.py`` ``login`` / ``AuthBLL.get_token_for_user``."""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                key, _, secret = base64.b64decode(auth.split(" ", 1)[1]).decode().partition(":")
            except ValueError:
                raise ApiError(401, 21, "Unauthorized (malformed credentials)") from None
            if key not in self.credentials or self.credentials[key] != secret:
                raise ApiError(401, 22, "Unauthorized (invalid credentials)")
        elif auth.lower().startswith("bearer "):
            self._check_token(headers)
        else:
            raise ApiError(401, 20, "Unauthorized (missing credentials)")
        now = int(time.time())
        claims = {
            "identity": {
                "user": self.user["id"],
                "company": self.user["company"],
                "role": "admin",
                "user_name": self.user["name"],
                "company_name": "fake",
            },
            "iat": now,
            "exp": now + 30 * 24 * 3600,
            "env": "test",
            "session_id": _new_id(),
            "api_version": self.api_version,
            "server_version": self.server_version,
            "server_build": "0",
            "feature_set": "basic",
        }
        return {"token": jwt.encode(claims, self._token_secret, algorithm="HS256")}

    def add_credentials(self, access_key: str, secret_key: str) -> None:
        """Seed an identity, as clearml-server's fixed users are seeded from its configuration
        (``CLEARML__secure__credentials__<name>__user_key``/``__user_secret`` in docker/docker-compose.yml)."""
        with self.lock:
            self.credentials[access_key] = secret_key

    def ep_auth__create_credentials(self, body: dict, headers: dict) -> dict:
        """``apiserver/services/auth.py`` ``create_credentials`` / ``AuthBLL.create_credentials``: a new access
        and secret key for the calling user, returned once."""
        key, secret = uuid.uuid4().hex[:20].upper(), uuid.uuid4().hex + uuid.uuid4().hex
        self.credentials[key] = secret
        return {"credentials": {"access_key": key, "secret_key": secret, "label": body.get("label")}}

    def ep_debug__ping(self, body: dict, headers: dict) -> dict:
        """``apiserver/services/debug.py`` ``ping``: ``{"msg": "ClearML server"}`` plus the request's fields."""
        return {"msg": "ClearML server", **(body or {})}

    def ep_server__info(self, body: dict, headers: dict) -> dict:
        return {"version": self.server_version, "build": "0", "commit": "fake", "api_version": self.api_version}

    def ep_users__get_current_user(self, body: dict, headers: dict) -> dict:
        return {
            "user": {
                "id": self.user["id"],
                "name": self.user["name"],
                "company": {"id": self.user["company"], "name": "fake"},
                "role": "admin",
                "preferences": {},
            },
            "getting_started": {},
            "settings": {"max_download_items": 1000},
        }

    # ------------------------------------------------------------------ projects

    def ep_projects__create(self, body: dict, headers: dict) -> dict:
        """``ProjectBLL.create``: a duplicate name is ``ExpectedUniqueData`` (400/801); parents are created."""
        name = (body.get("name") or "").strip("/")
        if not name:
            raise ApiError(400, 407, "Invalid project name")
        if any(p["name"] == name for p in self.projects.values()):
            raise ApiError(400, 801, "Project with the same name already exists", name=name)
        params = {k: v for k, v in body.items() if k != "name"}
        return {"id": self._ensure_project(name, **params)}

    def ep_projects__get_all(self, body: dict, headers: dict) -> dict:
        docs = _filter(self.projects.values(), body, list_fields=("id", "tags", "system_tags", "parent", "user"))
        return {"projects": [_project(p, body.get("only_fields")) for p in docs]}

    def ep_projects__get_all_ex(self, body: dict, headers: dict) -> dict:
        result = self.ep_projects__get_all(body, headers)
        if body.get("search_hidden"):
            for p in result["projects"]:
                if "hidden" in (self.projects[p["id"]].get("system_tags") or []):
                    p["hidden"] = True
        return result

    def ep_projects__get_by_id(self, body: dict, headers: dict) -> dict:
        project = self.projects.get(body.get("project"))
        if project is None:
            raise ApiError(400, 401, "Invalid project id", id=body.get("project"))
        return {"project": copy.deepcopy(project)}

    def ep_projects__update(self, body: dict, headers: dict) -> dict:
        project = self.projects.get(body.get("project"))
        if project is None:
            raise ApiError(400, 401, "Invalid project id", id=body.get("project"))
        fields = {
            k: body[k]
            for k in ("description", "tags", "system_tags", "default_output_destination", "name")
            if k in body
        }
        project.update(fields)
        project["last_update"] = _now()
        return {"updated": 1, "fields": fields}

    # ------------------------------------------------------------------ tasks: create / read / edit

    def _new_task_doc(self, fields: dict) -> dict:
        """``TaskBLL.create`` + the DB model's defaults (``apiserver/database/model/task/task.py``)."""
        now = _now()
        task = {
            "id": _new_id(),
            "user": self.user["id"],
            "company": self.user["company"],
            "created": now,
            "last_update": now,
            "last_change": now,
            "last_changed_by": self.user["id"],
            "status": "created",
            "status_reason": "",
            "status_message": "",
            "status_changed": now,
            "comment": "",
            "tags": [],
            "system_tags": [],
            "output": {},
            "execution": {"test_split": 0, "parameters": {}, "model_desc": {}, "model_labels": {}, "artifacts": {}},
            "script": {"binary": "python", "repository": "", "entry_point": ""},
            "last_iteration": 0,
            "last_metrics": {},
            "hyperparams": {},
            "configuration": {},
            "runtime": {},
            "models": {"input": [], "output": []},
            "container": {},
        }
        self._apply_task_fields(task, fields, merge_embedded=False)
        return task

    def _apply_task_fields(self, task: dict, fields: dict, *, merge_embedded: bool) -> dict:
        """``prepare_create_fields`` / ``prepare_for_save`` for the fields the SDK sends."""
        fields = copy.deepcopy(fields)
        if "output_dest" in fields:
            dest = fields.pop("output_dest")
            if dest is not None:
                fields["output"] = {**(task.get("output") or {}), "destination": dest}
        models = fields.get("models")
        if models:
            for kind in ("input", "output"):
                for item in models.get(kind) or []:
                    item["updated"] = _now()
            fields["models"] = {"input": models.get("input") or [], "output": models.get("output") or []}
        execution = fields.get("execution")
        if isinstance(execution, dict) and isinstance(execution.get("artifacts"), list):
            execution["artifacts"] = {self._artifact_id(a): a for a in execution["artifacts"]}
        script = fields.get("script")
        if isinstance(script, dict):
            # "Strip all script fields ... to avoid unusable names and paths"
            for key in ("repository", "entry_point", "working_dir", "binary", "branch", "tag", "version_num"):
                if isinstance(script.get(key), str):
                    script[key] = script[key].strip()
        if "type" in fields and fields["type"] not in TASK_TYPES:
            raise ApiError(400, 12, f"Validation error: invalid task type {fields['type']}")
        for key, value in fields.items():
            if merge_embedded and key in TASK_EMBEDDED_FIELDS and isinstance(value, dict):
                merged = dict(task.get(key) or {})
                merged.update(value)
                task[key] = merged
            else:
                task[key] = value
        return fields

    @staticmethod
    def _artifact_id(artifact: dict) -> str:
        """``apiserver/bll/task/artifacts.py`` ``get_artifact_id``."""
        return f"{_md5(artifact['key'])}_{artifact.get('mode', 'output')}"

    def _validate_task(self, task: dict) -> None:
        """``TaskBLL.validate``: parent and project must exist; name at least 3 characters."""
        if not task.get("name") or len(str(task["name"]).strip()) < 3:
            raise ApiError(400, 12, "Validation error: task name must be at least 3 characters", name=task.get("name"))
        if not task.get("type"):
            raise ApiError(400, 11, "Missing required fields: type")
        parent = task.get("parent")
        if parent and not parent.startswith("__DELETED__") and parent not in self.tasks:
            raise invalid_task_id(msg="invalid parent", parent=parent)
        self._project_id(task.get("project"))

    def ep_tasks__create(self, body: dict, headers: dict) -> dict:
        """``apiserver/services/tasks.py`` ``create``."""
        fields = {k: v for k, v in body.items() if k in TASK_CREATE_FIELDS and v is not None}
        task = self._new_task_doc(fields)
        self._validate_task(task)
        self.tasks[task["id"]] = task
        return {"id": task["id"]}

    def ep_tasks__get_by_id(self, body: dict, headers: dict) -> dict:
        return {"task": self._task_out(self.task(body.get("task")))}

    def _project_ids_with_children(self, ids: list[str]) -> list[str]:
        """``apiserver/bll/project/sub_projects.py`` ``_ids_with_children`` (``project_ids_with_children``): the
        projects and every project below them (clearml-server keeps the hierarchy in names: ``parent/child``)."""
        names = [self.projects[i]["name"] for i in ids if i in self.projects]
        children = [pid for pid, p in self.projects.items() if any(p["name"].startswith(name + "/") for name in names)]
        return list(dict.fromkeys([*ids, *children]))

    def _get_all_tasks(self, body: dict) -> list[dict]:
        body = dict(body)
        # ``apiserver/services/utils.py`` ``process_include_subprojects``: without it (the default), a project
        # filter matches that project only, so a pipeline controller in ``<project>/.pipelines/<name>`` is not found
        if body.pop("include_subprojects", False) and body.get("project"):
            projects = body["project"] if isinstance(body["project"], list) else [body["project"]]
            body["project"] = self._project_ids_with_children(projects)
        for key in list(body):
            if isinstance(body[key], str) and key in ("status", "type", "project", "parent", "user"):
                body[key] = [body[key]]
        docs = _filter(
            self.tasks.values(),
            body,
            list_fields=(
                "id",
                "user",
                "tags",
                "system_tags",
                "type",
                "status",
                "project",
                "parent",
                "hyperparams.*",
                "execution.queue",
                "models.input.model",
            ),
            pattern_fields=("name", "comment"),
        )
        return [self._task_out(t, body.get("only_fields")) for t in docs]

    def ep_tasks__get_all(self, body: dict, headers: dict) -> dict:
        return {"tasks": self._get_all_tasks(body)}

    def ep_tasks__get_all_ex(self, body: dict, headers: dict) -> dict:
        return {"tasks": self._get_all_tasks(body)}

    def ep_tasks__get_by_id_ex(self, body: dict, headers: dict) -> dict:
        return {"tasks": self._get_all_tasks(body)}

    def ep_tasks__edit(self, body: dict, headers: dict) -> dict:
        """``apiserver/services/tasks.py`` ``edit``: created only unless ``force``; embedded documents
        (execution, script, output, models) are merged key by key, everything else replaced."""
        task = self.task(body.get("task"))
        if not body.get("force") and task["status"] != "created":
            raise invalid_task_status(expected="created", status=task["status"], task=task["id"])
        fields = {k: v for k, v in body.items() if k in (*TASK_CREATE_FIELDS, "status")}
        if not fields:
            return {"updated": 0}
        candidate = copy.deepcopy(task)
        applied = self._apply_task_fields(candidate, fields, merge_embedded=True)
        self._validate_task(candidate)
        task.clear()
        task.update(candidate)
        user_set_allowed = {"name", "comment", "created", "project", "tags", "system_tags", "status_message"}
        self._touch(task, set_last_update=not set(applied) <= user_set_allowed)
        return {"updated": 1, "fields": _json_roundtrip(applied)}

    def ep_tasks__update(self, body: dict, headers: dict) -> dict:
        """``apiserver/services/tasks.py`` ``update``: the user-settable fields, in any status."""
        task = self.task(body.get("task"))
        fields = {}
        for key in TASK_UPDATE_FIELDS:
            if key in body:
                fields[key] = body[key]
        if "output__error" in fields:
            task.setdefault("output", {})["error"] = fields.pop("output__error")
        if "project" in fields:
            self._project_id(fields["project"])
        task.update(fields)
        self._touch(task, set_last_update=False)
        return {"updated": 1 if fields else 0, "fields": _json_roundtrip(fields)}

    def ep_tasks__clone(self, body: dict, headers: dict) -> dict:
        """``TaskBLL.clone_task`` (``apiserver/bll/task/task_bll.py``).

        Copies script, container, execution (less ``queue`` and output artifacts), hyperparams,
        configuration, input models, output destination, tags and system tags (less
        ``development``/``archived``); ``parent`` is the request's ``new_task_parent``, else the
        source's parent, else the source itself. ``new_task_hyperparams``/``configuration``/
        ``container`` replace the copied ones; ``execution_overrides`` are merged into execution.
        """
        src = self.task(body.get("task"))
        now = _now()
        execution = copy.deepcopy(src.get("execution") or {})
        overrides = copy.deepcopy(body.get("execution_overrides") or {})
        input_models = copy.deepcopy(body.get("new_task_input_models") or [])
        if overrides:
            model = overrides.pop("model", None)
            if model and not input_models:
                input_models = [{"model": model, "name": "Input Model"}]
            if isinstance(overrides.get("artifacts"), list):
                overrides["artifacts"] = {self._artifact_id(a): a for a in overrides["artifacts"]}
            execution.update(overrides)
        if isinstance(execution.get("artifacts"), dict):
            execution["artifacts"] = {
                k: a for k, a in execution["artifacts"].items() if a.get("mode", "output") != "output"
            }
        execution.pop("queue", None)
        src_parent = src.get("parent")
        parent_default = src_parent if src_parent and not src_parent.startswith("__DELETED__") else src["id"]
        for m in input_models:
            m["updated"] = now
        new_project = None
        project = body.get("new_task_project")
        if not project and body.get("new_project_name"):
            project = self._ensure_project(body["new_project_name"])
            new_project = {"id": project, "name": body["new_project_name"]}
        system_tags = body.get("new_task_system_tags") or [
            t for t in src.get("system_tags") or [] if t not in ("development", "archived")
        ]
        task = self._new_task_doc({})
        task.update(
            name=body.get("new_task_name") or src.get("name"),
            comment=body.get("new_task_comment") or src.get("comment"),
            parent=body.get("new_task_parent") or parent_default,
            project=project or src.get("project"),
            tags=body.get("new_task_tags") or list(src.get("tags") or []),
            system_tags=system_tags,
            type=src.get("type"),
            script=copy.deepcopy(src.get("script")),
            output={"destination": src["output"]["destination"]}
            if (src.get("output") or {}).get("destination")
            else {},
            models={"input": input_models or copy.deepcopy((src.get("models") or {}).get("input") or []), "output": []},
            container=copy.deepcopy(body.get("new_task_container") or src.get("container") or {}),
            execution=execution,
            configuration=copy.deepcopy(body.get("new_task_configuration") or src.get("configuration") or {}),
            hyperparams=copy.deepcopy(body.get("new_task_hyperparams") or src.get("hyperparams") or {}),
        )
        self._validate_task(task)
        self.tasks[task["id"]] = task
        return {"id": task["id"], **({"new_project": new_project} if new_project else {})}

    def ep_tasks__set_requirements(self, body: dict, headers: dict) -> dict:
        """``set_requirements``: any status, but the task must have a script."""
        task = self.task(body.get("task"))
        if not task.get("script"):
            raise ApiError(400, 122, "Task has no script field", task=task["id"])
        task["script"]["requirements"] = body.get("requirements")
        self._touch(task)
        return {"updated": 1, "fields": {"script.requirements": body.get("requirements")}}

    def ep_tasks__add_or_update_artifacts(self, body: dict, headers: dict) -> dict:
        """``Artifacts.add_or_update_artifacts`` (force=True: any status), keyed by (key, mode)."""
        task = self.task(body.get("task"))
        artifacts = task.setdefault("execution", {}).setdefault("artifacts", {})
        for artifact in body.get("artifacts") or []:
            artifacts[self._artifact_id(artifact)] = copy.deepcopy(artifact)
        self._touch(task)
        return {"updated": 1}

    def ep_tasks__delete_artifacts(self, body: dict, headers: dict) -> dict:
        task = self.task(body.get("task"))
        artifacts = task.setdefault("execution", {}).setdefault("artifacts", {})
        deleted = 0
        for artifact in body.get("artifacts") or []:
            deleted += artifacts.pop(self._artifact_id(artifact), None) is not None
        self._touch(task)
        return {"deleted": deleted}

    def ep_tasks__add_or_update_model(self, body: dict, headers: dict) -> dict:
        """``add_or_update_model``: ``get_task_for_update(force=True)``, so only created/queued/in_progress."""
        task = self._task_for_update(body.get("task"), force=True)
        kind = body.get("type", "output")
        items = task.setdefault("models", {}).setdefault(kind, [])
        item = {"name": body.get("name"), "model": body.get("model"), "updated": _now()}
        for i, existing in enumerate(items):
            if existing.get("name") == item["name"]:
                items[i] = item
                break
        else:
            items.append(item)
        if body.get("iteration") is not None:
            task["last_iteration"] = max(task.get("last_iteration") or 0, int(body["iteration"]))
        self._touch(task)
        return {"updated": 1}

    def ep_tasks__delete_models(self, body: dict, headers: dict) -> dict:
        task = self._task_for_update(body.get("task"), force=True)
        for m in body.get("models") or []:
            kind = m.get("type", "output")
            task["models"][kind] = [i for i in task["models"].get(kind, []) if i.get("name") != m.get("name")]
        self._touch(task)
        return {"updated": 1}

    def ep_tasks__edit_runtime(self, body: dict, headers: dict) -> dict:
        task = self.task(body.get("task"))
        runtime = task.setdefault("runtime", {})
        runtime.update(body.get("add_or_update") or {})
        for key in body.get("remove") or []:
            runtime.pop(key, None)
        self._touch(task)
        return {"updated": 1}

    # ------------------------------------------------------------------ tasks: hyperparameters and configuration

    def ep_tasks__get_hyper_params(self, body: dict, headers: dict) -> dict:
        """``HyperParams.get_params``."""
        return {
            "params": [
                {"task": tid, "hyperparams": _hyperparams_list(self.task(tid).get("hyperparams"))}
                for tid in body.get("tasks") or []
            ]
        }

    def ep_tasks__edit_hyper_params(self, body: dict, headers: dict) -> dict:
        """``HyperParams.edit_params``: created only (or queued/in_progress with ``force``), unless every
        item is in the ``properties`` section; ``replace_hyperparams`` is none|section|all."""
        items = [dict(i) for i in body.get("hyperparams") or []]
        for item in items:
            if str(item.get("section", "")).lower() == "properties":
                item["section"] = "properties"
        properties_only = all(i["section"] == "properties" for i in items)
        task = self._task_for_update(
            body.get("task"), force=bool(body.get("force")), allow_all_statuses=properties_only
        )
        new = _hyperparams_from_list(items)
        replace = body.get("replace_hyperparams") or "none"
        hyperparams = task.setdefault("hyperparams", {})
        if replace == "all":
            task["hyperparams"] = new
        elif replace == "section":
            hyperparams.update(new)
        else:
            for section, params in new.items():
                hyperparams.setdefault(section, {}).update(params)
        self._touch(task, set_last_update=not properties_only)
        return {"updated": 1}

    def ep_tasks__delete_hyper_params(self, body: dict, headers: dict) -> dict:
        """``HyperParams.delete_params``."""
        items = [dict(i) for i in body.get("hyperparams") or []]
        for item in items:
            if str(item.get("section", "")).lower() == "properties":
                item["section"] = "properties"
        properties_only = all(i["section"] == "properties" for i in items)
        task = self._task_for_update(
            body.get("task"), force=bool(body.get("force")), allow_all_statuses=properties_only
        )
        hyperparams = task.setdefault("hyperparams", {})
        whole = {i["section"] for i in items if not i.get("name")}
        for item in items:
            if item.get("name"):
                if item["section"] in whole:
                    raise ApiError(
                        400, 15, "Cannot delete section field if the whole section was scheduled for deletion"
                    )
                hyperparams.get(item["section"], {}).pop(item["name"], None)
        for section in whole:
            hyperparams.pop(section, None)
        self._touch(task, set_last_update=not properties_only)
        return {"deleted": 1}

    def ep_tasks__edit_configuration(self, body: dict, headers: dict) -> dict:
        """``HyperParams.edit_configuration``: created only (queued/in_progress with ``force``)."""
        task = self._task_for_update(body.get("task"), force=bool(body.get("force")))
        new = {
            c["name"]: {k: c.get(k) for k in ("name", "value", "type", "description") if c.get(k) is not None}
            for c in body.get("configuration") or []
        }
        if body.get("replace_configuration"):
            task["configuration"] = new
        else:
            task.setdefault("configuration", {}).update(new)
        self._touch(task)
        return {"updated": 1}

    def ep_tasks__delete_configuration(self, body: dict, headers: dict) -> dict:
        task = self._task_for_update(body.get("task"), force=bool(body.get("force")))
        for name in set(body.get("configuration") or []):
            task.setdefault("configuration", {}).pop(name, None)
        self._touch(task)
        return {"deleted": 1}

    def ep_tasks__get_configurations(self, body: dict, headers: dict) -> dict:
        """``HyperParams.get_configurations``: items sorted by name, optionally only ``names``."""
        names = body.get("names")
        out = []
        for tid in body.get("tasks") or []:
            conf = self.task(tid).get("configuration") or {}
            items = [copy.deepcopy(c) for n, c in conf.items() if not names or n in names]
            out.append({"task": tid, "configuration": sorted(items, key=lambda c: c.get("name", ""))})
        return {"configurations": out}

    def ep_tasks__get_configuration_names(self, body: dict, headers: dict) -> dict:
        """``HyperParams.get_configuration_names`` (``skip_empty`` defaults to True)."""
        skip_empty = body.get("skip_empty", True)
        out = []
        for tid in body.get("tasks") or []:
            conf = self.task(tid).get("configuration") or {}
            names = sorted(n for n, c in conf.items() if not skip_empty or c.get("value") not in (None, ""))
            if names:
                out.append({"task": tid, "names": names})
        return {"configurations": out}

    # ------------------------------------------------------------------ tasks: status changes

    def ep_tasks__enqueue(self, body: dict, headers: dict) -> dict:
        """``apiserver/bll/task/task_operations.py`` ``enqueue_task``.

        ``queue_name`` finds or creates the queue; neither id nor name means the default queue.
        The change to ``queued`` goes through the state machine (from created, stopped or failed,
        or queued again), records ``enqueue_status`` (the status to return to on dequeue), sets
        ``execution.queue`` and removes the task from every other queue.
        """
        if body.get("queue") and body.get("queue_name"):
            raise ApiError(400, 12, "Either queue id or queue name should be provided")
        task = self.task(body.get("task"))
        update_execution_queue = body.get("update_execution_queue", True)
        if not update_execution_queue and not (
            task["status"] == "queued" and (task.get("execution") or {}).get("queue")
        ):
            raise ApiError(400, 12, "Cannot skip setting execution queue for a task that is not enqueued")
        queue_id = body.get("queue")
        if body.get("queue_name"):
            try:
                queue_id = self.queue_by_name(body["queue_name"])["id"]
            except KeyError:
                queue_id = self.create_queue(body["queue_name"])
        if not queue_id:
            queue_id = self._default_queue()["id"]
        if queue_id not in self.queues:
            raise ApiError(400, 701, "Invalid queue id", queue=queue_id)
        before = task["status"]
        if task["status"] == "queued" and task.get("enqueue_status"):
            before = task["enqueue_status"]
        res = self._change_status(
            task,
            "queued",
            status_reason=body.get("status_reason", ""),
            status_message=body.get("status_message", ""),
            force=bool(body.get("force")),
            enqueue_status=before,
        )
        res["fields"].pop("enqueue_status", None)
        queue = self.queues[queue_id]
        if not any(e["task"] == task["id"] for e in queue["entries"]):
            queue["entries"].append({"task": task["id"], "added": _now()})
            queue["last_update"] = _now()
        if update_execution_queue:
            task.setdefault("execution", {})["queue"] = queue_id
            res["fields"]["execution.queue"] = queue_id
        self._remove_from_queues(task["id"], exclude=queue_id)
        if body.get("verify_watched_queue"):
            res["queue_watched"] = any(any(q["id"] == queue_id for q in w["queues"]) for w in self.workers.values())
        return {"queued": 1, **_json_roundtrip(res)}

    def ep_tasks__dequeue(self, body: dict, headers: dict) -> dict:
        """``task_operations.dequeue_task`` / ``TaskBLL.dequeue_and_change_status``: back to the status
        before enqueueing (or ``new_status``); nothing changes unless the task is queued/in_progress."""
        task = self.task(body.get("task"))
        if body.get("new_status") and body["new_status"] not in STATUSES:
            raise ApiError(400, 12, f"Invalid task status: {body['new_status']}")
        res = self._dequeue_and_change_status(
            task,
            status_reason=body.get("status_reason", ""),
            status_message=body.get("status_message", ""),
            new_status=body.get("new_status"),
        )
        return {"dequeued": 1, **_json_roundtrip(res)}

    def ep_tasks__started(self, body: dict, headers: dict) -> dict:
        """``apiserver/services/tasks.py`` ``started``: to in_progress; ``started`` is set to now (a task
        already in_progress with ``started`` keeps the earlier time); ``completed`` and
        ``active_duration`` are cleared."""
        task = self.task(body.get("task"))
        now = _now()
        if task["status"] == "in_progress" and task.get("started"):
            extra: dict[str, Any] = {"started": _Min(now)}
        else:
            extra = {"started": now, "completed": _UNSET, "active_duration": _UNSET}
        res = self._change_status(
            task,
            "in_progress",
            status_reason=body.get("status_reason", ""),
            status_message=body.get("status_message", ""),
            force=bool(body.get("force")),
            **extra,
        )
        res["started"] = res["updated"]
        return _json_roundtrip(res)

    def _status_call(self, body: dict, new_status: str, **extra: Any) -> dict:
        """``set_task_status_from_call``."""
        task = self.task(body.get("task"))
        return _json_roundtrip(
            self._change_status(
                task,
                new_status,
                status_reason=body.get("status_reason", ""),
                status_message=body.get("status_message", ""),
                force=bool(body.get("force")),
                **extra,
            )
        )

    def ep_tasks__stopped(self, body: dict, headers: dict) -> dict:
        """``stopped``: to stopped (from queued, in_progress, closed; or any with force), sets ``completed``."""
        return self._status_call(body, "stopped", completed=_now())

    def ep_tasks__failed(self, body: dict, headers: dict) -> dict:
        """``failed``: to failed (only from in_progress, stopped or closed unless force), sets ``completed``."""
        return self._status_call(body, "failed", completed=_now())

    def ep_tasks__close(self, body: dict, headers: dict) -> dict:
        """``close``: to closed (only from stopped unless force)."""
        return self._status_call(body, "closed")

    def ep_tasks__completed(self, body: dict, headers: dict) -> dict:
        """``completed``: to completed (from in_progress or stopped unless force), sets ``completed``;
        ``publish=True`` then publishes."""
        res = self._status_call(body, "completed", completed=_now())
        if body.get("publish"):
            pub = self.ep_tasks__publish({"task": body["task"], "force": body.get("force")}, {})
            res["published"] = pub.get("updated")
            res["fields"]["status"] = "published"
        return res

    def ep_tasks__publish(self, body: dict, headers: dict) -> dict:
        """``task_operations.publish_task``: to published (from stopped, closed, failed, completed unless
        force); the last output model is marked ready if ``publish_model`` (default True)."""
        task = self.task(body.get("task"))
        if not body.get("force") and "published" not in STATE_MACHINE[task["status"]]:
            raise invalid_task_status("Invalid status change", current_status=task["status"], new_status="published")
        outputs = (task.get("models") or {}).get("output") or []
        if outputs and body.get("publish_model", True):
            model = self.models.get(outputs[-1]["model"])
            if model is not None:
                model["ready"] = True
        return self._status_call({**body, "force": True}, "published", published=_now())

    def ep_tasks__stop(self, body: dict, headers: dict) -> dict:
        """``apiserver/bll/task/task_operations.py`` ``stop_task``.

        A queued task, a development task, or one no live worker runs is stopped at once ("Stopped by
        <user>"). A task that a worker registered through ``workers.register`` runs (``last_worker`` set by
        its ``workers.status_report`` or ``tasks.started`` and ``last_update`` within clearml-server's
        ``task_update_timeout``, 600 s) keeps its status and gets ``status_message="stopping"``: the agent
        sees it (``clearml_agent/commands/worker.py`` ``TaskStopSignal``), kills the process and reports
        ``stopped`` itself. Tasks started by the test's own helpers (``start_task``, :class:`FakeAgent`) have
        no registered worker, so they stop at once as before. ``include_pipeline_steps`` stops the
        controller's steps first (``_get_pipeline_steps_for_controller_task``: tasks whose ``parent`` is it).
        """
        task = self.task(body.get("task"))
        if body.get("include_pipeline_steps"):
            for step in [t for t in self.tasks.values() if t.get("parent") == task["id"]]:
                if step["status"] in ("queued", "in_progress"):
                    self._stop_one(step, body, force=True)
        return _json_roundtrip(self._stop_one(task, body, force=bool(body.get("force"))))

    def _stop_one(self, task: dict, body: dict, *, force: bool) -> dict:
        is_queued = task["status"] == "queued"
        last_update = task.get("last_update")
        run_by_worker = (
            task.get("last_worker") in self.workers
            and last_update is not None
            and (_now() - last_update).total_seconds() < self.task_update_timeout
        )
        if is_queued or "development" in (task.get("system_tags") or []) or not run_by_worker:
            if is_queued:
                self._remove_from_queues(task["id"])
            new_status, message = "stopped", f"Stopped by {self.user['name']}"
        else:
            new_status, message = task["status"], "stopping"
        return self._change_status(
            task, new_status, status_reason=body.get("status_reason", ""), status_message=message, force=force
        )

    def ep_tasks__reset(self, body: dict, headers: dict) -> dict:
        """``task_operations.reset_task``: refused for published unless force; off the queues; metrics,
        output models, runtime, started/completed/published and execution.queue cleared (script too with
        ``clear_all``); then to created with status_reason "reset"; output artifacts dropped."""
        task = self.task(body.get("task"))
        force = bool(body.get("force"))
        if not force and task["status"] == "published":
            raise invalid_task_status(task=task["id"], status=task["status"])
        dequeued = {"removed": 1} if task["status"] == "queued" and self._remove_from_queues(task["id"]) else {}
        self._remove_from_queues(task["id"])
        if body.get("clear_all"):
            task["execution"] = {}
            task.pop("script", None)
        else:
            execution = task.setdefault("execution", {})
            execution.pop("queue", None)
            if isinstance(execution.get("artifacts"), dict):
                execution["artifacts"] = {k: a for k, a in execution["artifacts"].items() if a.get("mode") == "input"}
        self.events = [e for e in self.events if e.get("task") != task["id"]]
        task.setdefault("output", {}).pop("result", None)
        task["output"].pop("error", None)
        res = self._change_status(
            task,
            "created",
            status_reason="reset",
            status_message="reset",
            force=force,
            last_iteration=0,
            last_metrics={},
            models={"input": (task.get("models") or {}).get("input") or [], "output": []},
            runtime={},
            last_worker=_UNSET,
            last_worker_report=_UNSET,
            started=_UNSET,
            completed=_UNSET,
            published=_UNSET,
            active_duration=_UNSET,
            enqueue_status=_UNSET,
        )
        return {"dequeued": dequeued, "deleted_models": 0, "urls": {}, **_json_roundtrip(res)}

    def ep_tasks__archive(self, body: dict, headers: dict) -> dict:
        """``task_operations.archive_task``: dequeue (an in_progress task becomes stopped), tag archived."""
        archived = 0
        for tid in body.get("tasks") or []:
            task = self.task(tid)
            self._dequeue_and_change_status(
                task,
                status_reason=body.get("status_reason", ""),
                status_message=body.get("status_message", ""),
                new_status_for_aborted_task="stopped",
            )
            task["status_message"] = body.get("status_message", "")
            task["status_reason"] = body.get("status_reason", "")
            if "archived" not in task["system_tags"]:
                task["system_tags"].append("archived")
            self._touch(task, set_last_update=False)
            archived += 1
        return {"archived": archived}

    def ep_tasks__archive_many(self, body: dict, headers: dict) -> dict:
        ids = body.get("ids") or []
        self.ep_tasks__archive({**body, "tasks": ids}, headers)
        return {"succeeded": [{"id": i, "archived": True} for i in ids], "failed": []}

    def ep_tasks__delete(self, body: dict, headers: dict) -> dict:
        """``task_operations.delete_task``: created or archived only, unless force."""
        task = self.task(body.get("task"))
        if task["status"] != "created" and "archived" not in task["system_tags"] and not body.get("force"):
            raise ApiError(400, 123, "Task cannot be deleted due to status, use force=True", task=task["id"])
        self._remove_from_queues(task["id"])
        del self.tasks[task["id"]]
        self.events = [e for e in self.events if e.get("task") != task["id"]]
        return {"deleted": True, "updated_children": 0, "updated_models": 0, "events": {}, "urls": {}}

    def ep_tasks__ping(self, body: dict, headers: dict) -> dict:
        """``TaskBLL.set_last_update``: ``last_update`` now, ``active_duration`` for in_progress tasks."""
        task = self.task(body.get("task"))
        now = _now()
        task["last_update"] = now
        task["last_change"] = now
        if task["status"] == "in_progress" and task.get("started"):
            task["active_duration"] = int((now - task["started"]).total_seconds())
        return {}

    # ------------------------------------------------------------------ queues / workers

    def _default_queue(self) -> dict:
        """``QueueBLL.get_default``: the queue tagged ``default`` (400/707 if none, 400/708 if several)."""
        found = [q for q in self.queues.values() if "default" in (q.get("system_tags") or [])]
        if not found:
            raise ApiError(400, 707, "No queue is tagged as the default queue for this company")
        if len(found) > 1:
            raise ApiError(400, 708, "More than one queue is tagged as the default queue for this company")
        return found[0]

    def _queue_out(self, queue: dict, only_fields: list[str] | None = None) -> dict:
        return _project(queue, only_fields)

    def ep_queues__get_all(self, body: dict, headers: dict) -> dict:
        docs = _filter(self.queues.values(), body, list_fields=("id", "tags", "system_tags"), hidden_filter=False)
        return {"queues": [self._queue_out(q, body.get("only_fields")) for q in docs]}

    def ep_queues__get_all_ex(self, body: dict, headers: dict) -> dict:
        return self.ep_queues__get_all(body, headers)

    def ep_queues__get_by_id(self, body: dict, headers: dict) -> dict:
        queue = self.queues.get(body.get("queue"))
        if queue is None:
            raise ApiError(400, 701, "Invalid queue id", queue=body.get("queue"))
        return {"queue": self._queue_out(queue)}

    def ep_queues__create(self, body: dict, headers: dict) -> dict:
        name = body.get("name")
        if not name:
            raise ApiError(400, 11, "Missing required fields: name")
        if any(q["name"] == name for q in self.queues.values()):
            raise ApiError(400, 801, "Value combination already exists (unique field already contains this value)")
        return {"id": self.create_queue(name, system_tags=body.get("system_tags"), tags=body.get("tags"))}

    def ep_queues__get_default(self, body: dict, headers: dict) -> dict:
        queue = self._default_queue()
        return {"id": queue["id"], "name": queue["name"]}

    def ep_queues__get_queue_metrics(self, body: dict, headers: dict) -> dict:
        ids = body.get("queue_ids") or list(self.queues)
        return {
            "queues": [
                {"queue": q, "dates": [], "avg_waiting_times": [], "queue_lengths": []} for q in ids if q in self.queues
            ]
        }

    def ep_queues__get_next_task(self, body: dict, headers: dict) -> dict:
        queue = self.queues.get(body.get("queue"))
        if queue is None:
            raise ApiError(400, 701, "Invalid queue id", queue=body.get("queue"))
        if not queue["entries"]:
            return {}
        entry = queue["entries"].pop(0)
        return {"entry": _json_roundtrip(entry)}

    def ep_workers__get_all(self, body: dict, headers: dict) -> dict:
        """``WorkerBLL.get_all_with_projection``: registered workers, each queue as ``{id, name}``."""
        return {"workers": _json_roundtrip(list(self.workers.values()))}

    def _worker_queues(self, queue_ids: Iterable[str]) -> list[dict]:
        """``WorkerBLL.register_worker``: every queue must exist (``InvalidQueueId``, 400/701)."""
        invalid = [q for q in queue_ids if q not in self.queues]
        if invalid:
            raise ApiError(400, 701, "Invalid queue id", ids=invalid)
        return [{"id": q, "name": self.queues[q]["name"]} for q in queue_ids]

    def ep_workers__register(self, body: dict, headers: dict) -> dict:
        """``apiserver/services/workers.py`` ``register`` / ``WorkerBLL.register_worker``: the worker's entry
        (id, queues, register and activity times, tags); a non-positive ``timeout`` is refused (400/1002,
        ``worker_registration_failed``, ``apiserver/apierrors/errors.conf``). Registering again replaces the entry."""
        worker = body.get("worker")
        if not worker:
            raise ApiError(400, 11, "Missing required fields: worker")
        if body.get("timeout") is not None and body["timeout"] <= 0:
            raise ApiError(400, 1002, "Worker registration failed: invalid timeout", worker=worker)
        now = _now()
        self.workers[worker] = {
            "id": worker,
            "user": {"id": self.user["id"], "name": self.user["name"]},
            "company": {"id": self.user["company"]},
            "register_time": now,
            "register_timeout": body.get("timeout") or 600,
            "last_activity_time": now,
            "last_report_time": now,
            "queues": self._worker_queues(body.get("queues") or []),
            "tags": body.get("tags") or [],
            "system_tags": body.get("system_tags") or [],
            "task": None,
            "project": None,
        }
        return {}

    def ep_workers__unregister(self, body: dict, headers: dict) -> dict:
        """``WorkerBLL.unregister_worker``: an unknown worker is ``worker_not_registered`` (400/1004) unless
        ``apiserver.workers.auto_unregister``, which clearml-server's default ``apiserver.conf`` sets (true)."""
        self.workers.pop(body.get("worker"), None)
        return {}

    def ep_workers__status_report(self, body: dict, headers: dict) -> dict:
        """``WorkerBLL.status_report``: an unknown worker is registered (``_get_worker`` with the default
        ``auto_register``; without a worker id: ``invalid_worker_id``, 400/1001); its activity time, queue(s)
        and current task are updated; a reported task gets ``last_worker``, ``last_worker_report`` and
        ``last_update`` = now (an unknown task id: 400/101). Machine stats go to Elasticsearch there and are only
        counted here."""
        entry = self.workers.get(body.get("worker"))
        if entry is None and body.get("worker"):
            # ``_get_worker``: an unknown worker is registered on the spot when ``apiserver.workers.auto_register``
            # (true in clearml-server's default apiserver.conf); services mode's per-task workers
            # (``<agent>:service:<task id>``) only ever report this way
            self.ep_workers__register({"worker": body["worker"], "queues": body.get("queues") or []}, headers)
            entry = self.workers[body["worker"]]
        if entry is None:
            raise ApiError(400, 1001, "Invalid worker id", worker=body.get("worker"))
        now = _now()
        entry["last_activity_time"] = entry["last_report_time"] = now
        if body.get("queues"):
            entry["queues"] = self._worker_queues(body["queues"])
        for key in ("tags", "system_tags"):
            if body.get(key) is not None:
                entry[key] = body[key]
        entry["stats_reports"] = entry.get("stats_reports", 0) + bool(body.get("machine_stats"))
        task_id = body.get("task")
        if not task_id:
            entry["task"] = entry["project"] = None
            return {}
        task = self.tasks.get(task_id)
        if task is None:
            raise invalid_task_id(id=task_id)
        task["last_worker"] = entry["id"]
        task["last_worker_report"] = task["last_update"] = task["last_change"] = now
        entry["task"] = {"id": task["id"], "name": task.get("name")}
        return {}

    # ------------------------------------------------------------------ events

    def _add_events(self, events: list[dict], worker: str | None) -> dict:
        """``EventBLL.add_events`` (``apiserver/bll/event/event_bll.py``), in memory.

        Non-log events with the same (task, iter, metric, variant, key) overwrite each other (the
        ES document id is their md5); the task's ``last_iteration`` (max), ``last_metrics``
        (per md5(metric)/md5(variant): value, min/max and their iterations, first value, count,
        mean) and ``last_update`` are updated.
        """
        if not events:
            raise ApiError(400, 17, "Batch request contains no items")
        added = 0
        errors: dict[str, int] = {}
        batch_latest: dict[tuple, tuple] = {}
        for event in events:
            event = dict(event)
            event.pop("x_axis_label", None)
            task_id = event.get("task")
            event_type = (event.get("type") or "").replace(" ", "_")
            if not event_type:
                errors["Event must have a 'type' field"] = errors.get("Event must have a 'type' field", 0) + 1
                continue
            if task_id not in self.tasks:
                key = f"Invalid task id {task_id}"
                errors[key] = errors.get(key, 0) + 1
                continue
            event["type"] = event_type
            if "ts" in event:
                event["timestamp"] = event.pop("ts")
            event.setdefault("timestamp", int(time.time() * 1000))
            event.setdefault("worker", worker)
            if event.get("iter") is not None:
                event["iter"] = int(event["iter"])
            if "values" in event:
                event["value"] = event.pop("values")
            event["metric"] = event.get("metric") or ""
            event["variant"] = event.get("variant") or ""
            if event_type != "log":
                key = "-".join(str(event[f]) for f in ("task", "iter", "metric", "variant", "key") if f in event)
                if key in self._event_keys:
                    self.events[self._event_keys[key]] = event
                else:
                    self._event_keys[key] = len(self.events)
                    self.events.append(event)
            else:
                self.events.append(event)
            added += 1
            task = self.tasks[task_id]
            if event.get("iter") is not None:
                task["last_iteration"] = max(task.get("last_iteration") or 0, event["iter"])
            if event_type == "training_stats_scalar" and event.get("value") is not None:
                self._update_last_metrics(task, event, batch_latest)
            task["last_update"] = task["last_change"] = _now()
        if not added:
            raise ApiError(400, 131, f"Events not added: {errors}", **errors)
        return {"added": added, "errors": sum(errors.values()), "errors_info": errors}

    @staticmethod
    def _update_last_metrics(task: dict, event: dict, batch_latest: dict) -> None:
        """``EventBLL._update_last_scalar_events_for_task`` + ``get_last_metric_updates``.

        ``value`` is the batch's latest by (iter, timestamp); a later batch always overwrites it, as
        the real server's per-call aggregation does. min/max/first keep their iterations.
        """
        last = task.setdefault("last_metrics", {}).setdefault(_md5(event["metric"]), {})
        entry = last.setdefault(_md5(event["variant"]), {"metric": event["metric"], "variant": event["variant"]})
        value, it, ts = event["value"], event.get("iter", 0), event.get("timestamp", 0)
        pos_key = (task["id"], event["metric"], event["variant"])
        if pos_key not in batch_latest or (it, ts) >= batch_latest[pos_key]:
            batch_latest[pos_key] = (it, ts)
            entry["value"] = value
        if entry.get("first_value_iteration") is None or it < entry["first_value_iteration"]:
            entry["first_value"], entry["first_value_iteration"] = value, it
        if entry.get("min_value") is None or value < entry["min_value"]:
            entry["min_value"], entry["min_value_iteration"] = value, it
        if entry.get("max_value") is None or value > entry["max_value"]:
            entry["max_value"], entry["max_value_iteration"] = value, it
        count = entry.get("count", 0)
        entry["mean_value"] = round((entry.get("mean_value", 0) * count + value) / (count + 1), 2)
        entry["count"] = count + 1

    def ep_events__add(self, body: dict, headers: dict) -> dict:
        return self._add_events([body], headers.get("x-clearml-worker"))

    def ep_events__add_batch(self, body: Any, headers: dict) -> dict:
        events = body if isinstance(body, list) else [body]
        return self._add_events(events, headers.get("x-clearml-worker"))

    def ep_events__get_task_single_value_metrics(self, body: dict, headers: dict) -> dict:
        """``EventMetrics.get_task_single_value_metrics``: the events at iteration -2**31."""
        out = []
        for tid in body.get("tasks") or []:
            task = self.task(tid)
            values = [
                {k: e.get(k) for k in ("metric", "variant", "value", "timestamp")}
                for e in self.events
                if e.get("task") == tid
                and e.get("type") == "training_stats_scalar"
                and e.get("iter") == SINGLE_SCALAR_ITERATION
                and _metric_selected(e, body.get("metrics"))
            ]
            if values:
                out.append({"task": tid, "task_name": task.get("name"), "values": values})
        return {"tasks": out}

    def ep_events__scalar_metrics_iter_histogram(self, body: dict, headers: dict) -> dict:
        """``EventMetrics.get_scalar_metrics_average_per_iter`` (``apiserver/bll/event/event_metrics.py``).

        Single values are left out (``_task_conditions``: ``iter > SINGLE_SCALAR_ITERATION``). Per
        metric/variant, if there are at least ``samples`` points the iterations are bucketed by
        ``interval = ceil((max-min+1)/samples)`` (ES ``histogram``: bucket key =
        floor(iter/interval)*interval) and each bucket's value is the average; ``x``/``y`` lists are
        ordered by iteration. Only ``key="iter"`` is supported (timestamp keys are not). Variants
        are not grouped across metrics as ES aggregation groups do (same result for one task).
        """
        task = self.task(body.get("task"))
        key = body.get("key") or "iter"
        if key != "iter":
            raise ApiError(500, 9999, f"fake server: scalar histogram key {key!r} is not implemented")
        samples = int(body.get("samples") or 6000)
        series: dict[str, dict[str, list[tuple[int, float]]]] = {}
        for e in self.events:
            if (
                e.get("task") == task["id"]
                and e.get("type") == "training_stats_scalar"
                and e.get("iter") is not None
                and e["iter"] > SINGLE_SCALAR_ITERATION
                and _metric_selected(e, body.get("metrics"))
            ):
                series.setdefault(e["metric"], {}).setdefault(e["variant"], []).append((e["iter"], e["value"]))
        out: dict[str, dict[str, dict]] = {}
        for metric in sorted(series):
            for variant in sorted(series[metric]):
                points = series[metric][variant]
                interval = 1
                if len(points) >= samples:
                    lo = min(i for i, _ in points)
                    hi = max(i for i, _ in points)
                    interval = max(1, math.ceil(float(hi - lo + 1) / samples))
                buckets: dict[int, list[float]] = {}
                for it, value in points:
                    buckets.setdefault((it // interval) * interval, []).append(value)
                xs = sorted(buckets)
                out.setdefault(metric, {})[variant] = {
                    "name": variant,
                    "x": xs,
                    "y": [sum(buckets[x]) / len(buckets[x]) for x in xs],
                }
        return out

    def ep_events__get_task_log(self, body: dict, headers: dict) -> dict:
        """``events.get_task_log`` (API >= 2.9): the latest ``batch_size`` log events (``navigate_earlier``,
        the default), newest first unless ``order="asc"``. ``from_timestamp`` paging is not supported."""
        task = self.task(body.get("task"))
        logs = [e for e in self.events if e.get("task") == task["id"] and e.get("type") == "log"]
        logs.sort(key=lambda e: e.get("timestamp", 0))
        batch = int(body.get("batch_size") or 500)
        navigate_earlier = body.get("navigate_earlier", True)
        page = list(reversed(logs))[:batch] if navigate_earlier else logs[:batch]
        order = body.get("order")
        if order and ((navigate_earlier and order == "asc") or (not navigate_earlier and order == "desc")):
            page.reverse()
        return {"events": copy.deepcopy(page), "returned": len(page), "total": len(logs)}

    def ep_events__get_task_events(self, body: dict, headers: dict) -> dict:
        task = self.task(body.get("task"))
        types = body.get("event_type")
        events = [
            e
            for e in self.events
            if e.get("task") == task["id"]
            and (not types or e.get("type") in ([types] if isinstance(types, str) else types))
        ]
        return {"events": copy.deepcopy(events), "returned": len(events), "total": len(events), "scroll_id": None}

    # ------------------------------------------------------------------ models

    def _model(self, model_id: str | None) -> dict:
        model = self.models.get(model_id) if model_id else None
        if model is None:
            raise ApiError(400, 201, "Invalid model id", id=model_id)
        return model

    def _new_model(self, fields: dict) -> dict:
        now = _now()
        model = {
            "id": _new_id(),
            "user": self.user["id"],
            "company": self.user["company"],
            "created": now,
            "last_update": now,
            "name": fields.get("name") or "",
            "uri": fields.get("uri"),
            "framework": fields.get("framework"),
            "design": fields.get("design") or {},
            "labels": fields.get("labels") or {},
            "ready": bool(fields.get("ready", False)),
            "tags": list(fields.get("tags") or []),
            "system_tags": list(fields.get("system_tags") or []),
            "comment": fields.get("comment") or "",
            "task": fields.get("task"),
            "project": fields.get("project"),
            "parent": fields.get("parent"),
            "metadata": {},
        }
        for item in fields.get("metadata") or []:
            model["metadata"][item["key"]] = dict(item)
        self.models[model["id"]] = model
        return model

    def ep_models__create(self, body: dict, headers: dict) -> dict:
        if body.get("project"):
            self._project_id(body["project"])
        model = self._new_model(body)
        return {"id": model["id"], "created": True}

    def ep_models__get_by_id(self, body: dict, headers: dict) -> dict:
        return {"model": _json_roundtrip(self._model(body.get("model")))}

    def ep_models__get_all(self, body: dict, headers: dict) -> dict:
        body = dict(body)
        if "ready" in body:
            ready = body.pop("ready")
            docs = [m for m in self.models.values() if m.get("ready") == ready]
        else:
            docs = list(self.models.values())
        docs = _filter(docs, body, list_fields=("id", "tags", "system_tags", "project", "task", "framework", "user"))
        return {"models": [_project(m, body.get("only_fields")) for m in docs]}

    def ep_models__get_all_ex(self, body: dict, headers: dict) -> dict:
        return self.ep_models__get_all(body, headers)

    def _edit_model(self, model: dict, body: dict) -> dict:
        fields = {
            k: body[k]
            for k in (
                "uri",
                "name",
                "comment",
                "tags",
                "system_tags",
                "framework",
                "design",
                "labels",
                "ready",
                "project",
                "parent",
                "task",
            )
            if k in body and body[k] is not None
        }
        if "iteration" in body and body["iteration"] is not None:
            model["last_iteration"] = body["iteration"]
        if body.get("metadata") is not None:
            model["metadata"] = {i["key"]: dict(i) for i in body["metadata"]}
        model.update(fields)
        model["last_update"] = _now()
        return {"updated": 1, "fields": _json_roundtrip(fields)}

    def ep_models__edit(self, body: dict, headers: dict) -> dict:
        return self._edit_model(self._model(body.get("model")), body)

    def ep_models__update(self, body: dict, headers: dict) -> dict:
        return self._edit_model(self._model(body.get("model")), body)

    def ep_models__set_ready(self, body: dict, headers: dict) -> dict:
        model = self._model(body.get("model"))
        model["ready"] = True
        return {"updated": 1, "published_task": {}}

    def ep_models__update_for_task(self, body: dict, headers: dict) -> dict:
        """``models.update_for_task``: create (or, with ``override_model_id``, point the task at) the
        task's output model; the task must be created/queued/in_progress (``get_task_for_update`` with
        force)."""
        task = self._task_for_update(body.get("task"), force=True)
        if body.get("override_model_id"):
            model = self._model(body["override_model_id"])
            created = False
        else:
            model = self._new_model(
                {
                    "name": body.get("name") or task.get("name"),
                    "uri": body.get("uri"),
                    "comment": body.get("comment"),
                    "tags": body.get("tags"),
                    "system_tags": body.get("system_tags"),
                    "task": task["id"],
                    "project": task.get("project"),
                    "framework": (task.get("execution") or {}).get("framework"),
                    "labels": (task.get("execution") or {}).get("model_labels"),
                }
            )
            created = True
        self.ep_tasks__add_or_update_model(
            {
                "task": task["id"],
                "name": "Output Model",
                "model": model["id"],
                "type": "output",
                "iteration": body.get("iteration"),
            },
            headers,
        )
        return {"id": model["id"], "created": created, "updated": 1}

    def ep_models__add_or_update_metadata(self, body: dict, headers: dict) -> dict:
        model = self._model(body.get("model"))
        new = {i["key"]: dict(i) for i in body.get("metadata") or []}
        if body.get("replace_metadata"):
            model["metadata"] = new
        else:
            model.setdefault("metadata", {}).update(new)
        model["last_update"] = _now()
        return {"updated": 1}

    def ep_models__delete_metadata(self, body: dict, headers: dict) -> dict:
        model = self._model(body.get("model"))
        for key in body.get("keys") or []:
            model.get("metadata", {}).pop(key, None)
        return {"updated": 1}

    # ------------------------------------------------------------------ files host (uploads of the SDK)

    def handle_files(self, method: str, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        """A minimal ClearML fileserver: POST multipart stores each file under ``path/filename``; GET reads."""
        key = path[len("/files") :].lstrip("/")
        if method == "POST":
            stored = _parse_multipart(body, content_type)
            with self.lock:
                for name, data in stored.items():
                    self.files[f"{key}/{name.lstrip('/')}".strip("/")] = data
            return 200, json.dumps({k: k for k in stored}).encode()
        with self.lock:
            data = self.files.get(key)
        if data is None:
            return 404, b"not found"
        return 200, data


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


class _Min:
    def __init__(self, value: Any) -> None:
        self.value = value


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def _metric_selected(event: dict, metrics: list[dict] | None) -> bool:
    """``get_metric_variants_condition``: ``[{"metric": m, "variants": [...]}]``; empty means all."""
    if not metrics:
        return True
    for m in metrics:
        if m.get("metric") == event.get("metric"):
            variants = m.get("variants")
            if not variants or event.get("variant") in variants:
                return True
    return False


def _parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    match = re.search(r"boundary=\"?([^\";]+)\"?", content_type or "")
    if not match:
        return {"upload": body}
    boundary = b"--" + match.group(1).encode()
    out: dict[str, bytes] = {}
    for part in body.split(boundary):
        # exactly the CRLF framing a part (RFC 2046): stripping every CR and LF would eat a file's own last bytes
        part = part.removeprefix(b"\r\n").removesuffix(b"\r\n")
        if not part or part == b"--":
            continue
        head, _, data = part.partition(b"\r\n\r\n")
        name = re.search(rb'filename="([^"]*)"', head) or re.search(rb'name="([^"]*)"', head)
        out[(name.group(1).decode() if name else "upload")] = data
    return out


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler; ``fake`` is set on a subclass per server."""

    fake: FakeClearmlServer
    protocol_version = "HTTP/1.1"
    _path_re = re.compile(r"^/(?:v(?P<version>\d+\.\d+)/)?(?P<endpoint>[a-z_]+\.[a-z_]+)/?$")

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            # requests streams some bodies (ClearML's event batches) with chunked transfer encoding.
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if not size:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        # One request per connection: with keep-alive, a client thread of the controller process was seen
        # waiting forever for a reply to a request this server never received (about 1 run in 5, under load).
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(payload)

    def _handle(self, method: str) -> None:
        raw = self._read_body()
        path = self.path.split("?", 1)[0]
        if path.startswith("/files"):
            status, payload = self.fake.handle_files(method, path, raw, self.headers.get("Content-Type", ""))
            self._reply(status, payload, "application/octet-stream")
            return
        match = self._path_re.match(path)
        if not match:
            self._reply(404, json.dumps({"meta": {"result_code": 404, "result_msg": f"Invalid path {path}"}}).encode())
            return
        body: Any = None
        text = raw.decode("utf-8") if raw else ""
        try:
            if "json-lines" in (self.headers.get("Content-Type") or ""):
                body = [json.loads(line) for line in text.splitlines() if line.strip()]
            elif text.strip():
                body = json.loads(text)
        except json.JSONDecodeError as err:
            self._reply(
                400, json.dumps({"meta": {"result_code": 400, "result_subcode": 0, "result_msg": str(err)}}).encode()
            )
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, reply = self.fake.dispatch(match.group("endpoint"), match.group("version"), body, headers)
        self._reply(status, json.dumps(reply, default=_json_default).encode())

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")


class FakeAgent:
    """A thread that plays clearml-agent against a :class:`FakeClearmlServer`.

    It pulls tasks from ``queues`` (:meth:`FakeClearmlServer.start_task`) and, after
    ``run_seconds``, ends each as if its process exited (:meth:`FakeClearmlServer.agent_process_exited`)
    according to ``outcome(task)``: ``"completed"`` (exit code 0), ``"failed"`` (exit code 1),
    ``"stopped"`` (interrupted), or ``None`` to leave it running. Call :meth:`stop` (or use it as
    a context manager).
    """

    def __init__(
        self,
        server: FakeClearmlServer,
        queues: Iterable[str] = ("default",),
        *,
        outcome: Callable[[dict], str | None] = lambda task: "completed",
        run_seconds: float = 0.0,
        poll: float = 0.05,
        worker: str = "fake-agent",
    ) -> None:
        self.server = server
        self.queues = list(queues)
        self.outcome = outcome
        self.run_seconds = run_seconds
        self.poll = poll
        self.worker = worker
        self.handled: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fake-agent-{worker}", daemon=True)

    def start(self) -> FakeAgent:
        with self.server.lock:
            for q in self.queues:
                try:
                    self.server.queue_by_name(q)
                except KeyError:
                    self.server.create_queue(q)
            self.server.register_worker(self.worker, self.queues)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            task_id = None
            for q in self.queues:
                task_id = self.server.next_queued(q)
                if task_id:
                    break
            if not task_id:
                self._stop.wait(self.poll)
                continue
            with self.server.lock:
                self.server.start_task(task_id, worker=self.worker)
                self.handled.append(task_id)
            if self.run_seconds:
                self._stop.wait(self.run_seconds)
            with self.server.lock:
                task = self.server.task(task_id)
                if task["status"] != "in_progress":
                    continue
                result = self.outcome(copy.deepcopy(task))
                exit_code = {"completed": 0, "failed": 1, "stopped": -2}.get(result or "")
                if exit_code is not None:
                    self.server.agent_process_exited(task_id, exit_code, worker=self.worker)


__all__ = [
    "ACCESS_KEY",
    "API_VERSION",
    "SECRET_KEY",
    "SERVER_VERSION",
    "SINGLE_SCALAR_ITERATION",
    "STATE_MACHINE",
    "ApiError",
    "FakeAgent",
    "FakeClearmlServer",
]
