"""Retrain on a schedule or when a new dataset version is published (``d2ops schedule``).

Both run as ClearML services on the ``services`` queue and clone a *template pipeline*: a
pipeline controller task that has run once (``python pipelines/run_pipeline.py --config C``, or
any run in the UI's Pipelines page: its id is the template). Each firing clones it, sets its
``Args/`` hyperparameters (the experiment the clone's controller is rebuilt from) and enqueues it.

- ``cron``: :class:`clearml.automation.TaskScheduler`. A 5-field cron expression (UTC) is turned
  into ``add_task``'s minute/hour/day/weekdays/month fields; the forms ClearML cannot express
  exactly are refused (:func:`cron_to_schedule`), never approximated.
- ``on-data``: :class:`clearml.automation.TriggerScheduler`'s dataset trigger. ClearML replaces a
  task parameter whose value is exactly ``${dataset.id}`` with the triggering dataset's id, so the
  clone gets ``Args/data/dataset_id`` = the new version.

Both are single-instance: ClearML skips a firing while the previous clone is still queued or
running (a skipped cron slot waits for the next one; a skipped dataset version is not retried).

The schedulers are built without starting them (buildable offline and inspectable), then
:func:`start_scheduler` hands them to the services queue. On the agent, ClearML restores the
jobs from the scheduler task itself, so the task's entry point is ``python -m d2ops.clearml.schedules``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from clearml import Task
from clearml.automation import TaskScheduler, TriggerScheduler

from d2ops.clearml.controller import ARGS_PREFIX, LAUNCH_CONFIG_PROPERTY
from d2ops.clearml.hyperparams import flat_experiment, format_value, parameter_name
from d2ops.clearml.secrets import scrub_recorded_diff
from d2ops.config import check_overrides, load_config

__all__ = [
    "DATASET_ID_PARAM",
    "DATASET_ID_PLACEHOLDER",
    "CronSchedule",
    "ScheduleError",
    "build_cron_scheduler",
    "build_dataset_trigger",
    "close_scheduler",
    "cron_to_schedule",
    "describe_scheduler",
    "pipeline_task_parameters",
    "resolve_trigger_parameters",
    "start_scheduler",
]

log = logging.getLogger(__name__)

#: The controller parameter that carries a ClearML Dataset id (empty: use ``data/source``).
DATASET_ID_PARAM = f"{ARGS_PREFIX}data/dataset_id"
#: ClearML's ``DatasetTrigger._task_param``: a task parameter with exactly this value gets the dataset id.
DATASET_ID_PLACEHOLDER = "${dataset.id}"
#: Where the scheduler service tasks live unless told otherwise.
DEFAULT_SCHEDULER_PROJECT = "d2ops/schedules"
#: The scheduler task's entry point on the agent (see :func:`resume`).
REMOTE_ENTRY_POINT = "-m d2ops.clearml.schedules"

_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_CRON_DAY_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_SUPPORTED = (
    "supported (UTC): 'M H * * *' daily, 'M * * * *' hourly, 'M H * * DOW[,DOW|-DOW]' weekly, "
    "'M H D * *' monthly (D 1-28), 'M H D MON *' yearly; M, H, D, MON single numbers"
)
# Also the error type of user mistakes across d2ops' CLI (ValueError is reported without a traceback).


class ScheduleError(ValueError):
    """A schedule that cannot be set up as asked; the message says what to change."""


# --------------------------------------------------------------------------- cron


@dataclass(frozen=True)
class CronSchedule:
    """A cron expression as :meth:`TaskScheduler.add_task` fields (UTC)."""

    expr: str
    minute: int
    hour: int | None = None
    day: int | None = None
    weekdays: tuple[str, ...] | None = None
    month: int | None = None
    year: int | None = None

    def add_task_kwargs(self) -> dict[str, Any]:
        """The time arguments of ``TaskScheduler.add_task``."""
        return {
            "minute": self.minute,
            "hour": self.hour,
            "day": self.day,
            "weekdays": list(self.weekdays) if self.weekdays else None,
            "month": self.month,
            "year": self.year,
        }


def cron_to_schedule(expr: str, now: datetime | None = None) -> CronSchedule:
    """Translate ``expr`` (5 fields, UTC) into TaskScheduler fields, or raise :class:`ScheduleError`.

    TaskScheduler counts intervals from its start rather than matching calendar fields, so
    only the forms whose firings coincide exactly with cron's are accepted: one fixed minute;
    an hour that is fixed or ``*`` (hourly); a fixed day of month (1-28: ClearML cannot skip
    short months) or ``*``; a fixed month only for yearly runs; days of week only with ``*``
    days and months. ``now`` orders the weekdays (see :func:`_weekdays_from`).
    """
    fields = expr.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"cron expression {expr!r} has {len(fields)} fields; expected 5 (minute hour day-of-month month "
            f"day-of-week), e.g. '0 3 * * 1'"
        )
    minute_f, hour_f, day_f, month_f, dow_f = fields
    minute = _number(expr, 0, minute_f, 0, 59)
    if minute is None:
        raise ScheduleError(_unsupported(expr, 0, minute_f, "the minute must be one number 0-59"))
    hour = _number(expr, 1, hour_f, 0, 23)
    day = _number(expr, 2, day_f, 1, 28, hint="days 29-31 are missing in some months, which ClearML cannot skip")
    month = _number(expr, 3, month_f, 1, 12)
    if hour is None:
        if (day_f, month_f, dow_f) != ("*", "*", "*"):
            raise ScheduleError(_unsupported(expr, 1, hour_f, "an hourly schedule ('*' hour) needs '* * *' after it"))
        return CronSchedule(expr, minute=minute, hour=1)  # every hour at :minute
    if dow_f != "*":
        if day is not None or month is not None:
            raise ScheduleError(
                _unsupported(expr, 4, dow_f, "days of week need '*' day-of-month and month (cron ORs them)")
            )
        # day=1 takes the same code path as the documented day=0 and passes verify() at 00:00.
        weekdays = _weekdays_from(_parse_weekdays(expr, dow_f), hour, minute, now)
        return CronSchedule(expr, minute=minute, hour=hour, day=1, weekdays=weekdays)
    if month is not None:
        if day is None:
            raise ScheduleError(_unsupported(expr, 2, day_f, "a fixed month needs a fixed day (a yearly run)"))
        return CronSchedule(expr, minute=minute, hour=hour, day=day, month=month, year=1)
    if day is not None:
        return CronSchedule(expr, minute=minute, hour=hour, day=day, month=1)
    return CronSchedule(expr, minute=minute, hour=hour, day=1)


def _unsupported(expr: str, index: int, value: str, why: str) -> str:
    return f"cron {expr!r}: {_CRON_FIELDS[index]} field {value!r} is not supported: {why}; {_SUPPORTED}"


def _number(expr: str, index: int, value: str, low: int, high: int, hint: str = "") -> int | None:
    """A single number in [low, high], or None for ``*``; ranges, lists and steps are refused."""
    if value == "*":
        return None
    if not value.isdigit():
        raise ScheduleError(_unsupported(expr, index, value, f"use one number {low}-{high} or '*'"))
    number = int(value)
    if not low <= number <= high:
        extra = f" ({hint})" if hint else ""
        raise ScheduleError(_unsupported(expr, index, value, f"must be {low}-{high}{extra}"))
    return number


def _parse_weekdays(expr: str, value: str) -> list[str]:
    """Cron days of week (0-7, names, lists, ranges; 0 and 7 are Sunday) as ClearML weekday names."""
    days: set[int] = set()
    for item in value.lower().split(","):
        bounds = item.split("-")
        if len(bounds) > 2 or "/" in item:
            raise ScheduleError(_unsupported(expr, 4, value, "use numbers 0-7 or mon..sun, lists and ranges"))
        first, last = (_cron_day(expr, value, b) for b in (bounds[0], bounds[-1]))
        if last < first:
            raise ScheduleError(_unsupported(expr, 4, value, f"range {item!r} runs backwards"))
        days.update(d % 7 for d in range(first, last + 1))
    # cron 0=Sunday .. 6=Saturday; ClearML's list is Monday-first.
    return [_WEEKDAYS[(d - 1) % 7] for d in sorted(days, key=lambda d: (d - 1) % 7)]


def _cron_day(expr: str, value: str, token: str) -> int:
    if token in _CRON_DAY_NAMES:
        return _CRON_DAY_NAMES[token]
    if token.isdigit() and int(token) <= 7:
        return int(token)
    raise ScheduleError(_unsupported(expr, 4, value, f"{token!r} is not a day of week (0-7 or mon..sun)"))


def _weekdays_from(weekdays: list[str], hour: int, minute: int, now: datetime | None) -> tuple[str, ...]:
    """The weekdays in week order, starting with the first one to come after ``now``.

    TaskScheduler fires the list's first day first and then each next one in turn; starting at
    the first upcoming day keeps it from skipping the days before it in the first week.
    """
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)

    def wait(day: str) -> timedelta:
        ahead = (_WEEKDAYS.index(day) - now.weekday()) % 7
        at = now.replace(hour=hour, minute=minute, second=0, microsecond=0) + timedelta(days=ahead)
        return at - now if at > now else at + timedelta(days=7) - now

    first = min(range(len(weekdays)), key=lambda i: wait(weekdays[i]))
    return tuple(weekdays[first:] + weekdays[:first])


# --------------------------------------------------------------------------- parameters


def pipeline_task_parameters(
    config: str | None = None, overrides: Sequence[str] = (), dataset_id: str | None = None
) -> dict[str, str]:
    """The ``Args/`` hyperparameters a cloned controller gets; a parameter left out keeps the template's value.

    A pipeline's experiment is its controller's ``Args/<section>/<name>`` hyperparameters (what the
    agent rebuilds the pipeline from, :func:`d2ops.clearml.controller.controller_experiment`). With
    ``config``, every one of them is set from ``config`` + ``overrides`` (validated here, now). With
    ``overrides`` alone, only those keys are set, on top of the template's values: each key and value is
    checked against the schema here, now, and the credential rule applies (a typo or a bad value fails
    at ``d2ops schedule`` time, not in every firing; the clone validates the whole result when it starts).
    ``dataset_id`` is a ClearML Dataset id, or
    :data:`DATASET_ID_PLACEHOLDER` for a dataset trigger.
    """
    params: dict[str, str] = {}
    if config:
        flat = flat_experiment(load_config(config, list(overrides)))
        params.update({f"{ARGS_PREFIX}{name}": format_value(value) for name, value in flat.items()})
        # the clone's steps keep this config's name as General/config, not the template's (a user property)
        params[f"properties/{LAUNCH_CONFIG_PROPERTY}"] = config
    else:
        check_overrides(list(overrides))  # keys, values and credentials, never echoed; the clone checks the whole
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ScheduleError(f"--set {item!r}: expected KEY=VALUE, e.g. --set solver.max_iter=500")
            params[f"{ARGS_PREFIX}{parameter_name(key)}"] = text
    if dataset_id:
        params[DATASET_ID_PARAM] = dataset_id
    return params


def resolve_trigger_parameters(task_parameters: dict[str, str], dataset_id: str) -> dict[str, str]:
    """What a dataset trigger's clone receives: ClearML's substitution rule, for display and checks.

    ClearML (``TriggerScheduler._launch_job``) replaces a value equal to ``${dataset.id}``
    (whole value, not a substring) with the triggering dataset's id.
    """
    return {key: dataset_id if value == DATASET_ID_PLACEHOLDER else value for key, value in task_parameters.items()}


# --------------------------------------------------------------------------- building


def build_cron_scheduler(
    pipeline_id: str,
    schedule: CronSchedule,
    *,
    queue: str = "services",
    name: str | None = None,
    task_parameters: dict[str, str] | None = None,
    target_project: str | None = None,
    scheduler_project: str = DEFAULT_SCHEDULER_PROJECT,
    docker_image: str | None = None,
) -> Any:
    """A :class:`TaskScheduler` (not started) that clones ``pipeline_id`` onto ``queue`` on ``schedule``."""
    _check_pipeline_id(pipeline_id)
    name = name or f"retrain {pipeline_id[:8]} '{schedule.expr}'"
    scheduler: Any = TaskScheduler(force_create_task_name=name, force_create_task_project=scheduler_project)
    scrub_recorded_diff(scheduler_task(scheduler))
    scheduler.add_task(
        schedule_task_id=pipeline_id,
        queue=queue,
        name=name,
        target_project=target_project,
        single_instance=True,
        task_parameters=task_parameters or None,
        **schedule.add_task_kwargs(),
    )
    scheduler.d2ops_docker_image = docker_image
    return scheduler


def build_dataset_trigger(
    pipeline_id: str,
    dataset_project: str,
    *,
    dataset_name: str | None = None,
    tags: Sequence[str] = (),
    on_publish: bool = True,
    queue: str = "services",
    name: str | None = None,
    task_parameters: dict[str, str] | None = None,
    target_project: str | None = None,
    scheduler_project: str = DEFAULT_SCHEDULER_PROJECT,
    docker_image: str | None = None,
) -> Any:
    """A :class:`TriggerScheduler` (not started): a new dataset version in ``dataset_project`` clones the pipeline.

    The clone gets ``Args/data/dataset_id`` = the new version's id (plus ``task_parameters``).
    ``on_publish`` watches published versions, else finalized (completed) ones. ClearML resolves
    ``dataset_project`` to the ``<project>/.datasets/<name>`` projects that exist *now* (one trigger
    each), so a project without a dataset yet is an error.
    """
    _check_pipeline_id(pipeline_id)
    name = name or f"retrain {pipeline_id[:8]} on {dataset_project}" + (f"/{dataset_name}" if dataset_name else "")
    scheduler: Any = TriggerScheduler(force_create_task_name=name, force_create_task_project=scheduler_project)
    scrub_recorded_diff(scheduler_task(scheduler))
    scheduler.add_dataset_trigger(
        schedule_task_id=pipeline_id,
        schedule_queue=queue,
        trigger_project=dataset_project,
        trigger_name=f"^{re.escape(dataset_name)}$" if dataset_name else None,
        trigger_on_publish=on_publish,
        # clearml-server ORs a tags filter unless it starts with "__$all" (TriggerScheduler passes it as is).
        trigger_on_tags=["__$all", *tags] if tags else None,
        name=name,
        target_project=target_project,
        single_instance=True,
        task_parameters={**(task_parameters or {}), DATASET_ID_PARAM: DATASET_ID_PLACEHOLDER},
    )
    triggers = scheduler.get_triggers()
    if not triggers:
        close_scheduler(scheduler)
        raise ScheduleError(
            f"no ClearML dataset found in project {dataset_project!r} (ClearML watches the "
            f"'{dataset_project}/.datasets/<name>' projects that exist when the trigger is created): register a "
            f"first version (d2ops.clearml.datasets.register_s3_dataset or `clearml-data create --project "
            f"{dataset_project} --name <name>`), then schedule again. Offline there is no server to ask."
        )
    if len(triggers) > 1:  # ClearML restores triggers by name on the agent: keep them apart
        for trigger in triggers:
            trigger.name = f"{name} [{trigger.project}]"
    scheduler.d2ops_docker_image = docker_image
    return scheduler


def scheduler_task(scheduler: Any) -> Any:
    """The scheduler's own ClearML task."""
    # clearml 2.1.12: BaseScheduler keeps its task in a private attribute; there is no public accessor.
    return scheduler._task


def close_scheduler(scheduler: Any) -> None:
    """Close a scheduler that will not be started (``--dry-run``): its task record is kept, closed."""
    scheduler_task(scheduler).close()


def _check_pipeline_id(pipeline_id: str) -> None:
    if not pipeline_id or not pipeline_id.strip():
        raise ScheduleError(
            "no --pipeline-id: schedules clone an existing pipeline run. Run the pipeline once on the cluster "
            "(`python pipelines/run_pipeline.py --config C`) or pick a run in the ClearML UI (Pipelines, the run's "
            "'Details' / ID), and pass its controller task id"
        )


def _prepare_service_task(task: Any, docker_image: str | None) -> None:
    """Make the scheduler task restartable on an agent: ``python -m d2ops.clearml.schedules`` (:func:`resume`).

    ClearML detects the script that called ``Task.init``, here its own scheduler module, and the
    CLI arguments cannot be replayed (a cron expression does not survive its entry-point string).
    The agent needs d2ops importable: run it in the d2ops image (``clearml.docker_image``).
    """
    task.set_repo()  # waits for ClearML's repository detection, which would otherwise overwrite the script
    task.set_script(repository="", branch="", commit="", diff="", working_dir=".", entry_point=REMOTE_ENTRY_POINT)
    if docker_image:
        task.set_base_docker(docker_image)
    else:
        log.warning("no docker image (--config): the services agent must have d2ops installed to run the schedule")


# --------------------------------------------------------------------------- inspecting and starting

_JOB_FIELDS: tuple[str, ...] = ("name", "base_task_id", "queue", "target_project", "single_instance", "task_parameters")
_CRON_JOB_FIELDS = (*_JOB_FIELDS, "minute", "hour", "day", "weekdays", "month", "year", "recurring")
_TRIGGER_FIELDS = (*_JOB_FIELDS, "project", "match_name", "tags", "on_publish")


def describe_scheduler(scheduler: Any) -> dict[str, Any]:
    """What a built scheduler will do, read back from its ClearML job objects (for ``--dry-run``)."""
    task = scheduler_task(scheduler)
    fields: tuple[str, ...]
    if hasattr(scheduler, "get_scheduled_tasks"):
        kind, jobs, fields = "cron", scheduler.get_scheduled_tasks(), _CRON_JOB_FIELDS
    else:
        kind, jobs, fields = "dataset-trigger", scheduler.get_triggers(), _TRIGGER_FIELDS
    return {
        "kind": kind,
        "scheduler_task": {"id": task.id, "name": task.name, "project": task.get_project_name()},
        "jobs": [{key: getattr(job, key) for key in fields} for job in jobs],
    }


def start_scheduler(scheduler: Any, queue: str = "services") -> None:
    """Hand the scheduler to ``queue`` (a clearml-agent in services mode); this process then exits.

    Needs a ClearML server: offline there is no queue to send it to.
    """
    if Task.is_offline():
        raise ScheduleError(
            "ClearML is in offline mode: a schedule needs a server and an agent on the services queue. "
            "Use --dry-run to see what would be scheduled, or configure clearml.conf and try again"
        )
    _prepare_service_task(scheduler_task(scheduler), getattr(scheduler, "d2ops_docker_image", None))
    scheduler.start_remotely(queue=queue)


def resume() -> None:
    """The scheduler task's body on the agent: rebuild the scheduler from the task and run it forever."""
    task: Any = Task.init()
    sections = task.get_configuration_objects() or {}
    # clearml 2.1.12: the name of the configuration object a TaskScheduler keeps its jobs in (no public name).
    scheduler = TaskScheduler() if TaskScheduler._configuration_section in sections else TriggerScheduler()
    scheduler.start()


if __name__ == "__main__":
    resume()
