"""ClearML Datasets over S3 data: register a prefix as a dataset version (links, no re-upload), fetch one.

A version registered here holds *links* to the S3 objects (``Dataset.add_external_files``), so
registering costs a listing, not a copy. Its id is what ``d2ops schedule on-data`` hands to the
pipeline (``Pipeline/dataset_id``) and what the lineage records.

ClearML reaches the store through its own storage layer: an endpoint (MinIO, moto) needs an
``sdk.aws.s3.credentials`` entry in clearml.conf whose ``host`` carries the port, as in the URI.

Offline (no server) ClearML 2.1.12 can create a dataset and its links, but it cannot finalize,
publish or fetch one: the version is kept as an offline session for
``Dataset.import_offline_session(zip, upload=True, finalize=True)``. It is also created as the
process's main task (``Task.init``), so offline it must not run inside another open task, and
clearml.conf needs ``sdk.development.vcs_repo_detect_async: false``: ``add_external_files``
appends to the task's detected script and fails (``'NoneType' object has no attribute 'diff'``)
while the default background detection is still running.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clearml import Dataset, Task

from d2ops.clearml.secrets import scrub_recorded_diff
from d2ops.storage import s3 as storage

__all__ = ["DatasetError", "dataset_local_copy", "register_s3_dataset"]

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset that cannot be registered or fetched as asked; the message says what to do."""


def register_s3_dataset(
    source_uri: str,
    project: str,
    name: str,
    tags: Sequence[str] = (),
    manifest: Mapping[str, Any] | None = None,
    *,
    publish: bool = False,
) -> str:
    """Register the objects under ``source_uri`` as a new version of ClearML dataset ``project``/``name``.

    ``manifest`` is the download step's manifest (``files_total``, ``identity``...): the link
    count must match it (otherwise the prefix changed since the download) and it is attached
    as the version's metadata. ``publish`` publishes the version, which is what
    ``d2ops schedule on-data`` waits for. Returns the dataset id (``offline-...`` offline).
    """
    if not storage.is_s3_uri(source_uri):
        raise DatasetError(
            f"{source_uri!r} is not an s3:// URI: only S3 objects can be linked without uploading them; "
            "upload a local folder with `clearml-data add --files DIR` instead"
        )
    offline = Dataset.is_offline()
    if offline and Task.current_task() is not None:
        raise DatasetError(
            "ClearML is offline and a task is open in this process: offline, ClearML creates the dataset as the "
            "process's main task and would take over that one. Register from a separate process, or with a server"
        )
    dataset: Any = Dataset.create(
        dataset_name=name,
        dataset_project=project,
        dataset_tags=list(tags) or None,
        description=f"links to {source_uri} (d2ops)",
    )
    # clearml 2.1.12: a Dataset's task is private; there is no public accessor for the diff it records.
    scrub_recorded_diff(dataset._task)
    try:
        _check_manifest(source_uri, dataset.add_external_files(source_url=_prefix(source_uri)), manifest)
    except DatasetError:
        _discard(dataset, offline)
        raise
    if manifest:
        dataset.set_metadata(dict(manifest), metadata_name="d2ops_manifest", ui_visible=False)
    dataset.upload()  # links only: nothing is uploaded; offline this writes the dataset state
    if offline:
        log.info("offline dataset %s kept in %s", dataset.id, dataset.get_offline_mode_folder())
        dataset_id = str(dataset.id)
        _close_offline_session()
        return dataset_id
    dataset.finalize()
    if publish:
        dataset.publish()
    return str(dataset.id)


def _close_offline_session() -> None:
    """Offline the dataset is this process's main task: closing it writes the session zip."""
    session: Any = Task.current_task()
    if session is not None:
        session.close()


def _discard(dataset: Any, offline: bool) -> None:
    """Drop a version that failed its checks, so no half-made draft is left behind."""
    if offline:
        _close_offline_session()
    else:
        Dataset.delete(dataset_id=dataset.id, force=True)


def _prefix(uri: str) -> str:
    """The URI as a folder, so ``s3://h/b/data`` does not also link ``s3://h/b/data2/...``."""
    return uri if uri.endswith("/") else f"{uri}/"


def _check_manifest(source_uri: str, linked: int, manifest: Mapping[str, Any] | None) -> None:
    expected = (manifest or {}).get("files_total")
    if linked == 0:
        raise DatasetError(
            f"no objects found under {source_uri}: check the URI and, for an endpoint, that clearml.conf has an "
            "sdk.aws.s3.credentials entry whose host includes the port (e.g. host: 'minio:9000')"
        )
    if expected is not None and int(expected) != linked:
        raise DatasetError(
            f"{source_uri} now holds {linked} objects but the download saw {expected}: the data changed since it "
            "was downloaded; rerun the download step and register again"
        )


def dataset_local_copy(dataset_id: str, target: Path | None = None) -> Path:
    """The files of dataset version ``dataset_id``, local: ClearML's read-only cached copy, or a copy in ``target``.

    Needs a ClearML server (the version's file list lives there).
    """
    if Dataset.is_offline():
        raise DatasetError(
            f"cannot fetch ClearML dataset {dataset_id!r} offline (ClearML keeps dataset contents on the server): "
            "leave dataset_id empty and read data.source instead"
        )
    dataset: Any = Dataset.get(dataset_id=dataset_id)
    if target is not None:
        return Path(dataset.get_mutable_local_copy(str(target), overwrite=True))
    return Path(dataset.get_local_copy())
