"""d2ops.clearml.datasets: a real offline ClearML Dataset linking objects on a real local S3 endpoint.

Registration runs in a child process: ClearML reads its S3 credentials (clearml.conf, host with
port) once per process, and offline a dataset becomes its process's main task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from d2ops.clearml.datasets import DatasetError, dataset_local_copy, register_s3_dataset
from d2ops.clearml.session import enable_offline
from d2ops.storage import s3 as storage
from d2ops.storage.local_s3 import DUMMY_CREDENTIALS, LocalS3, local_s3_endpoint

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import json, sys
    from clearml import Task
    from d2ops.clearml.datasets import DatasetError, register_s3_dataset

    Task.set_offline(True)
    uri, manifest = sys.argv[1], json.loads(sys.argv[2])
    out = {"id": register_s3_dataset(uri, "d2ops/data", "shapes", ["approved", "v1"], manifest)}
    try:
        register_s3_dataset(uri, "d2ops/data", "shapes", [], {**manifest, "files_total": 99})
    except DatasetError as err:
        out["mismatch"] = str(err)
    print("RESULT " + json.dumps(out))
    """
)

# 5 s or more on 2 cores (a ClearML Dataset registered in a child process): `make test` runs these, not test-fast
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3() -> Iterator[LocalS3]:
    with local_s3_endpoint() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def registered(s3: LocalS3, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Upload a tiny dataset, register it offline from a child process, return the session's record."""
    tmp_path = tmp_path_factory.mktemp("register")
    src = tmp_path / "src"
    files = {"train/a.jpg": b"x" * 100, "train/_annotations.coco.json": b"{}", "valid/b.jpg": b"y" * 7}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    uri = s3.uri("datasets", "shapes")
    stats = storage.upload(src, uri, create_bucket=True, progress=False)
    conf = tmp_path / "clearml.conf"
    key, secret = DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"], DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    conf.write_text(
        f'sdk {{ aws {{ s3 {{ credentials: [{{host: "{s3.host}", key: "{key}", secret: "{secret}", '
        "multipart: false, secure: false}] } }\n"
        # Offline, add_external_files appends to the script ClearML detects; detect it before returning
        # from Task.init, not in a thread (clearml 2.1.12 fails on a script that is not detected yet).
        "development { vcs_repo_detect_async: false } }"
    )
    script = tmp_path / "register.py"
    script.write_text(CHILD)
    cache = tmp_path / "clearml"
    inherited = ("CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID", "CLEARML_TASK_ID", "TRAINS_TASK_ID")
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update(CLEARML_CONFIG_FILE=str(conf), CLEARML_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    manifest = {"source": uri, "files_total": stats.files_total, "identity": stats.identity}
    run = subprocess.run(
        [sys.executable, str(script), uri, json.dumps(manifest)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.split("RESULT ", 1)[1].splitlines()[0])
    session = cache / "offline" / result["id"]
    return {"uri": uri, "files": files, "result": result, "session": session, "stats": stats, "secret": secret}


def _state(session: Path) -> dict[str, Any]:
    (state,) = session.glob("data/**/artifacts/state/state.json")
    return json.loads(state.read_text())


def test_registration_links_the_s3_objects_without_uploading(registered: dict[str, Any]) -> None:
    session, files = registered["session"], registered["files"]
    assert registered["result"]["id"].startswith("offline-")
    state = _state(session)
    links = {entry["relative_path"]: entry for entry in state["dataset_link_entries"]}
    assert set(links) == set(files)
    for rel, data in files.items():
        assert links[rel]["link"] == f"{registered['uri']}/{rel}"
        assert links[rel]["size"] == len(data)
    assert state["dataset_file_entries"] == []  # nothing copied into the dataset
    assert not list(session.glob("data/**/*.jpg"))
    task = json.loads((session / "task.json").read_text())
    assert task["name"] == "shapes"
    assert task["project_name"] == "d2ops/data/.datasets/shapes"
    assert "dataset" in task["system_tags"]
    assert {"approved", "v1"} <= set(task["tags"])
    assert Path(f"{session}.zip").is_file()  # ready for Dataset.import_offline_session


def test_registration_records_the_download_manifest_and_no_credentials(registered: dict[str, Any]) -> None:
    session = registered["session"]
    (metadata,) = session.glob("data/**/artifacts/d2ops_manifest/*")
    assert registered["stats"].identity in metadata.read_text()
    for path in session.rglob("*"):
        if path.is_file():
            assert registered["secret"].encode() not in path.read_bytes(), path


def test_a_prefix_that_changed_since_the_download_is_refused(registered: dict[str, Any]) -> None:
    message = registered["result"]["mismatch"]
    assert "now holds 3 objects but the download saw 99" in message
    assert "rerun the download step" in message


def test_only_s3_sources_can_be_linked() -> None:
    with pytest.raises(DatasetError, match="not an s3:// URI"):
        register_s3_dataset("/data/shapes", "d2ops/data", "shapes")


def test_offline_registration_inside_an_open_task_is_refused(tmp_path: Path) -> None:
    """Offline, ClearML would turn the open (step) task into the dataset: refuse instead."""
    from clearml import Task

    enable_offline(tmp_path / "clearml")
    task = Task.init(project_name="d2ops/test", task_name="download", auto_connect_frameworks=False)
    try:
        with pytest.raises(DatasetError, match="a task is open in this process"):
            register_s3_dataset("s3://127.0.0.1:9/b/p", "d2ops/data", "shapes")
        assert "dataset" not in (task.get_system_tags() or [])
    finally:
        task.close()


def test_fetching_a_dataset_offline_says_what_to_do(tmp_path: Path) -> None:
    enable_offline(tmp_path / "clearml")
    with pytest.raises(DatasetError, match=r"leave dataset_id empty and read data\.source"):
        dataset_local_copy("0123abcd")
