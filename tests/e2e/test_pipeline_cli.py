"""pipelines/run_pipeline.py --offline as a user runs it: a local dataset folder, a failing gate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from d2ops.utils.offline_session import session_file, session_names

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


#: Stand-in credentials: any of them appearing in a file the run leaves behind is a leak.
SENTINELS = {
    "AWS_ACCESS_KEY_ID": "D2OPSSENTINELKEY7F3A",
    "AWS_SECRET_ACCESS_KEY": "d2ops-sentinel-secret-9c1e5b",
    "CLEARML_API_ACCESS_KEY": "D2OPSSENTINELCLEARMLKEY",
    "CLEARML_API_SECRET_KEY": "d2ops-sentinel-clearml-secret-41d2",
    "D2OPS_SERVE_TOKEN": "d2ops-sentinel-token-77aa",
}
#: Credentials that only clearml.conf holds (not the environment): ClearML's own API keys among them.
CONF_SENTINELS = {
    "clearml.conf api.credentials.access_key": "D2OPSCONFAPIKEY5B2C",
    "clearml.conf api.credentials.secret_key": "d2ops-conf-api-secret-e83f",
    "clearml.conf sdk.aws.s3.key": "D2OPSCONFS3KEY19D4",
    "clearml.conf sdk.aws.s3.secret": "d2ops-conf-s3-secret-2a7c",
    "clearml.conf sdk.azure.storage account_key": "d2ops-conf-azure-key-c4b9",
}
#: The value of a credential-looking key nested in a list of a --set override.
NESTED_SENTINEL = {"--set model.overrides[0].secret_key": "d2ops-sentinel-nested-6d0a"}
EVERY_SENTINEL = {**SENTINELS, **CONF_SENTINELS, **NESTED_SENTINEL}

CLEARML_CONF = """
api.credentials {{ access_key: "{0}", secret_key: "{1}" }}
sdk.aws.s3 {{ key: "{2}", secret: "{3}" }}
sdk.azure.storage.containers: [ {{ account_name: "d2opsdemo", account_key: "{4}" }} ]
"""


def _leaks(root: Path, skip: tuple[Path, ...] = ()) -> list[str]:
    """Every file (and zip member) under ``root`` that contains a sentinel value."""
    hits = []
    for path in root.rglob("*"):
        if not path.is_file() or any(path == s or s in path.parents for s in skip):
            continue
        blobs = [(str(path), path.read_bytes())]
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                blobs += [(f"{path}!{name}", archive.read(name)) for name in archive.namelist()]
        for where, blob in blobs:
            hits += [f"{name} in {where}" for name, value in EVERY_SENTINEL.items() if value.encode() in blob]
    return hits


def _on_console(*texts: str) -> list[str]:
    return [f"{name} on the console" for name, value in EVERY_SENTINEL.items() if any(value in t for t in texts)]


def _project_with_an_uncommitted_credential(root: Path) -> tuple[Path, Path]:
    """A git repository holding the pipeline launcher and the smoke config, committed; then an
    uncommitted edit of the config that holds every clearml.conf credential (as a careless local
    edit would), which ClearML records as the task's ``git diff``. Returns (repository, edited file)."""
    (root / "pipelines").mkdir(parents=True)
    shutil.copy(REPO / "pipelines" / "run_pipeline.py", root / "pipelines")
    shutil.copytree(REPO / "configs", root / "configs")  # smoke.yaml with its _BASE_ (demo.yaml)
    config = root / "configs" / "smoke.yaml"
    git = ["git", "-c", "user.name=d2ops test", "-c", "user.email=test@d2ops.invalid", "-C", str(root)]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "launcher and config"]):
        subprocess.run([*git, *args], check=True, capture_output=True, timeout=60)
    edit = "".join(f"# {name}: {value}\n" for name, value in CONF_SENTINELS.items())
    config.write_text(config.read_text() + "# an ordinary uncommitted edit\n" + edit)
    return root, config


def test_offline_pipeline_from_s3_with_a_failing_gate_leaks_no_credentials(tmp_path: Path) -> None:
    """The offline pipeline script as a user runs it, with sentinel credentials in its environment
    and in its clearml.conf, and an uncommitted edit holding the latter in a tracked file (ClearML
    records it as the git diff): data and checkpoints on a real local S3 endpoint, a quality gate
    that fails. Beside it, two runs the config refuses at once: a URI with credentials in it and a
    credential key nested in a list, both passed with --set. Afterwards no session file, zip, log,
    artifact, output, uploaded object or console output contains any sentinel."""
    import boto3

    from d2ops.data.synthetic import generate_shapes_dataset
    from d2ops.storage import s3 as storage
    from d2ops.storage.local_s3 import local_s3_endpoint

    data = generate_shapes_dataset(tmp_path / "data", counts={"train": 8, "valid": 4, "test": 4})
    project, edited = _project_with_an_uncommitted_credential(tmp_path / "project")
    conf = tmp_path / "conf" / "clearml.conf"
    conf.parent.mkdir()
    conf.write_text(CLEARML_CONF.format(*CONF_SENTINELS.values()))
    env = {k: v for k, v in os.environ.items() if k not in {"CLEARML_PROC_MASTER_ID", "TRAINS_PROC_MASTER_ID"}}
    env.update(SENTINELS, CLEARML_CACHE_DIR=str(tmp_path / "clearml"), CLEARML_CONFIG_FILE=str(conf))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # this checkout's d2ops
    launcher = [sys.executable, str(project / "pipelines" / "run_pipeline.py"), "--offline",
                "--config", "configs/smoke.yaml"]  # fmt: skip
    with local_s3_endpoint() as s3:
        uri = s3.uri("sentinel", "datasets/shapes/")
        storage.upload(data, uri, create_bucket=True, progress=False)
        nested = NESTED_SENTINEL["--set model.overrides[0].secret_key"]
        credentials_in_uri = f"s3://{SENTINELS['AWS_ACCESS_KEY_ID']}:{SENTINELS['AWS_SECRET_ACCESS_KEY']}@"
        refused_env = {**env, "CLEARML_CACHE_DIR": str(tmp_path / "refused-clearml")}
        refused = {  # start the two refused runs now: they take seconds, beside the pipeline's minutes
            "uri": subprocess.Popen(
                [*launcher, "--dataset-uri", uri.replace("s3://", credentials_in_uri),
                 "--set", f"clearml.output_uri={s3.uri('sentinel', 'runs').replace('s3://', credentials_in_uri)}"],
                cwd=project, env=refused_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ),
            "nested key": subprocess.Popen(
                [*launcher, "--dataset-uri", uri, "--set",
                 f"model.overrides=[{{MODEL.WEIGHTS: '', secret_key: {nested}}}]"],
                cwd=project, env=refused_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ),
        }  # fmt: skip
        proc = subprocess.run(
            [
                *launcher,
                "--dataset-uri", uri,
                "--set", "solver.max_iter=4",
                "--set", "solver.checkpoint_period=2",
                "--set", "solver.eval_period=0",
                "--set", f"runtime.output_dir={tmp_path / 'run'}",
                "--set", f"data.cache_dir={tmp_path / 'cache'}",
                "--set", f"registry.local_dir={tmp_path / 'registry'}",
                "--set", f"clearml.output_uri={s3.uri('sentinel', 'runs')}",
                "--set", "registry.quality_gate={metric: bbox.AP50, min_value: 99.5}",
            ],
            cwd=project, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        refused_output = {name: p.communicate(timeout=300) for name, p in refused.items()}
        client = boto3.client("s3", endpoint_url=s3.endpoint_url)
        uploaded = [o["Key"] for o in client.list_objects_v2(Bucket="sentinel").get("Contents", [])]
        for key in uploaded:
            body = client.get_object(Bucket="sentinel", Key=key)["Body"].read()
            assert not [n for n, v in EVERY_SENTINEL.items() if v.encode() in body], f"credential in s3 object {key}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(key.endswith("last_checkpoint") for key in uploaded), uploaded  # checkpoints went to S3

    # The refused runs: exit 2 at once, naming the key; no session, no upload.
    for name, p in refused.items():
        assert p.returncode == 2, (name, refused_output[name][1][-3000:])
        assert "Traceback" not in refused_output[name][1]
    assert "data.source: a URI with credentials" in refused_output["uri"][1]
    assert "clearml.output_uri: a URI with credentials" in refused_output["uri"][1]
    assert "model.overrides[0].secret_key: credentials are not allowed" in refused_output["nested key"][1]
    assert not (tmp_path / "refused-clearml").exists()
    assert all(key.startswith(("datasets/", "runs/")) for key in uploaded), uploaded

    # It ends as the demo does: headline numbers, the gate verdict, the bundle, and summary.json and
    # report.html beside the run's outputs.
    assert "d2ops: offline pipeline finished" in proc.stdout and "FAILED" in proc.stdout
    assert f"summary written to {tmp_path / 'run' / 'summary.json'}" in proc.stdout
    assert f"report written to  {tmp_path / 'run' / 'report.html'}" in proc.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["quality_gate"]["passed"] is False and Path(summary["model_bundle"]).is_dir()
    assert (tmp_path / "run" / "report.html").stat().st_size > 0
    sessions = summary["clearml_sessions"]
    assert list(sessions) == ["download", "train", "evaluate", "infer", "register"]
    register = Path(sessions["register"])
    (name,) = [n for n in session_names(register) if "/artifacts/model_registration/" in n]
    record = json.loads(session_file(register, name) or b"{}")
    assert record["publish_requested"] is False and record["published"] is False
    task = json.loads(session_file(register, "task.json") or b"{}")
    assert "quality gate failed" in task["offline_output_models"][0]["init"]["comment"]
    # The overrides reached the step's hyperparameters (and so the ClearML UI): as the experiment's
    # own values (solver/max_iter) or as the overrides text.
    hyperparams = json.loads(session_file(sessions["train"], "task.json") or b"{}")["hyperparams"]
    values = {f"{section}/{name}": str(p.get("value")) for section, ps in hyperparams.items() for name, p in ps.items()}
    assert values.get("solver/max_iter") == "4" or "solver.max_iter=4" in values.get("General/overrides", ""), values
    assert any(uri in value for value in values.values()), values
    # Every step recorded the uncommitted edit, without the lines that held clearml.conf's credentials.
    for step, session in sessions.items():
        diff = json.loads(session_file(session, "task.json") or b"{}")["script"]["diff"]
        assert "+# an ordinary uncommitted edit" in diff, (step, diff[-2000:])
        assert diff.count("[d2ops: line removed from the recorded diff") == len(CONF_SENTINELS), (step, diff)

    # The secrets scan: every file the runs left (sessions, their zips and logs, outputs, the download
    # cache, the registry), all but the credentials' own sources; and the console of every run.
    zips = list((tmp_path / "clearml" / "offline").glob("*.zip"))  # the sessions: the scan reads their members
    assert len(zips) == 5 and sum(len(session_names(z)) for z in zips) > 20
    leaks = _leaks(tmp_path, skip=(conf, edited, project / ".git"))
    leaks += _on_console(proc.stdout, proc.stderr, *(text for out in refused_output.values() for text in out))
    assert leaks == []


def test_bad_config_key_fails_before_any_session(tmp_path: Path) -> None:
    env = {**os.environ, "CLEARML_CACHE_DIR": str(tmp_path / "clearml")}
    proc = subprocess.run(
        [sys.executable, "pipelines/run_pipeline.py", "--offline", "--set", "solver.max_iters=5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "solver.max_iters: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "clearml" / "offline").exists()
