"""Credentials stay out of the git diff ClearML records with each task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2ops.clearml.secrets import known_secret_values, redact

DIFF = """diff --git a/configs/demo.yaml b/configs/demo.yaml
--- a/configs/demo.yaml
+++ b/configs/demo.yaml
@@ -1,3 +1,4 @@
 name: demo
+# aws_secret_access_key: wJalrXUtnSENTINELbPxRfiCY
 solver:
-  max_iter: 300
+  max_iter: 400
"""


def test_redact_removes_only_lines_holding_a_known_value() -> None:
    clean, removed = redact(DIFF, ["wJalrXUtnSENTINELbPxRfiCY"])
    assert removed == 1
    assert "wJalrXUtnSENTINELbPxRfiCY" not in clean
    assert "+  max_iter: 400" in clean and "-  max_iter: 300" in clean
    assert redact(DIFF, []) == (DIFF, 0)


def test_known_values_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value-123")
    monkeypatch.setenv("D2OPS_SERVE_TOKEN", "abc")  # too short to match safely: ignored
    values = known_secret_values()
    assert "env-secret-value-123" in values and "abc" not in values


#: A PEM private key as a Google service-account file holds it (one JSON string, \n escapes).
_PEM_LINES = ["MIIEvQIBADANBgkqhkiG9w0BAQEFAASCSENTINELpemline1AAA", "SENTINELpemline2BBBwggSjAgEAAoIBAQC7"]
_PEM = "-----BEGIN PRIVATE KEY-----\n" + "\n".join(_PEM_LINES) + "\n-----END PRIVATE KEY-----\n"


def _service_account(path: Path, tag: str) -> Path:
    path.write_text(json.dumps({
        "type": "service_account", "project_id": "d2ops-demo", "client_email": "svc@d2ops-demo.example",
        "private_key_id": f"{tag}-private-key-id-0001", "private_key": _PEM.replace("SENTINEL", tag),
    }))  # fmt: skip
    return path


def test_known_values_come_from_the_environment_by_name_and_from_credential_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sa = _service_account(tmp_path / "gcs-sa.json", "ENVFILE")
    env = {
        "CLEARML_API_ACCESS_KEY": "env-clearml-access-0001",
        "CLEARML_API_SECRET_KEY": "env-clearml-secret-0001",
        "AWS_ACCESS_KEY_ID": "env-aws-key-id-0001",
        "AWS_SECRET_ACCESS_KEY": "env-aws-secret-0001",
        "AWS_SESSION_TOKEN": "env-aws-session-0001",
        "AZURE_STORAGE_KEY": "env-azure-key-0001",
        "MINIO_ROOT_PASSWORD": "env-minio-password-0001",
        "D2OPS_SERVE_TOKEN": "env-serve-token-0001",
        "SOME_CI_DEPLOY_TOKEN": "env-other-token-0001",  # named like a credential
        "DATABASE_URL": "postgres://env-db-user:env-db-password-0001@db:5432/x",  # userinfo of a URI
        "GOOGLE_APPLICATION_CREDENTIALS": str(sa),  # a path: the file's keys are secrets, the path is not
        "AZURE_STORAGE_ACCOUNT": "envazureaccountname",  # names, not secrets
        "D2OPS_DEVICE": "cpuonly",
        "OLDPWD": "/work/previous-folder",  # a folder, though its name ends like "password"
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    values = known_secret_values()
    not_secret = {"GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT", "D2OPS_DEVICE", "DATABASE_URL", "OLDPWD"}
    secret = {v for k, v in env.items() if k not in not_secret}
    assert secret <= values, secret - values
    assert {"env-db-password-0001", "ENVFILE-private-key-id-0001"} <= values
    assert {line.replace("SENTINEL", "ENVFILE") for line in _PEM_LINES} <= values
    assert (
        not {str(sa), "envazureaccountname", "cpuonly", "/work/previous-folder", "-----BEGIN PRIVATE KEY-----"} & values
    )
    # A diff of the service-account file itself (JSON, \n escapes) loses the key's lines.
    diff = "+" + json.dumps({"private_key": _PEM.replace("SENTINEL", "ENVFILE")}) + "\n context line\n"
    clean, removed = redact(diff, values)
    assert removed == 1 and "ENVFILE" not in clean and "context line" in clean


#: Every credential clearml.conf can hold (clearml 2.1.12's api.conf and sdk.conf, clearml-agent's git
#: credentials, the environment section), each a distinct sentinel.
CLEARML_CONF = """
api {
    api_server: "https://conf-api-user:conf-api-url-password@api.example:8008"
    credentials { access_key: "CONFAPIACCESSKEY0001", secret_key: "conf-api-secret-key-0001" }
}
sdk {
    aws.s3 {
        key: "CONFS3DEFAULTKEY0001", secret: "conf-s3-default-secret-0001", token: "conf-s3-default-token-0001"
        credentials: [
            {host: "minio.example:9000", key: "CONFS3HOSTKEY0001", secret: "conf-s3-host-secret-0001",
             token: "conf-s3-host-token-0001", multipart: false, secure: false}
            {bucket: "confbucketname", key: "CONFS3BUCKETKEY0001", secret: 12345678901}
        ]
    }
    azure.storage.containers: [ {account_name: "confazureaccount", account_key: "conf-azure-account-key-0001"} ]
    google.storage {
        credentials_json: "GCS_DEFAULT"
        credentials: [ {bucket: "confgcsbucket", credentials_json: "GCS_BUCKET"} ]
    }
    development.default_output_uri: "s3://conf-output-key-0001:conf-output-secret-0001@minio.example:9000/out"
}
agent { git_user: "confgituser", git_pass: "conf-git-password-0001" }
environment { AWS_SECRET_ACCESS_KEY: "conf-environment-secret-0001", SOME_SETTING: "confnotsecret" }
"""


def test_known_values_come_from_every_credential_in_clearml_conf(tmp_path: Path) -> None:
    """clearml.conf as ClearML itself reads it (CLEARML_CONFIG_FILE): a fresh process, no credentials
    in its environment."""
    default = _service_account(tmp_path / "default-sa.json", "GCSDEFAULT")
    bucket = _service_account(tmp_path / "bucket-sa.json", "GCSBUCKET")
    conf = tmp_path / "clearml.conf"
    conf.write_text(CLEARML_CONF.replace("GCS_DEFAULT", str(default)).replace("GCS_BUCKET", str(bucket)))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CLEARML_", "TRAINS_", "AZURE_", "GOOGLE_"))
    }
    env["CLEARML_CONFIG_FILE"] = str(conf)
    code = "import json; from d2ops.clearml.secrets import known_secret_values as k; print(json.dumps(sorted(k())))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    values = set(json.loads(proc.stdout))
    expected = {
        "CONFAPIACCESSKEY0001", "conf-api-secret-key-0001", "conf-api-url-password",
        "CONFS3DEFAULTKEY0001", "conf-s3-default-secret-0001", "conf-s3-default-token-0001",
        "CONFS3HOSTKEY0001", "conf-s3-host-secret-0001", "conf-s3-host-token-0001",
        "CONFS3BUCKETKEY0001", "12345678901",
        "conf-azure-account-key-0001", "conf-output-key-0001", "conf-output-secret-0001",
        "conf-git-password-0001", "conf-environment-secret-0001",
        "GCSDEFAULT-private-key-id-0001", "GCSBUCKET-private-key-id-0001",
        *(line.replace("SENTINEL", tag) for line in _PEM_LINES for tag in ("GCSDEFAULT", "GCSBUCKET")),
    }  # fmt: skip
    assert expected <= values, sorted(expected - values)
    names = {"minio.example:9000", "confbucketname", "confazureaccount", "confgcsbucket", "confgituser",
             "confnotsecret", str(default), str(bucket)}  # fmt: skip
    assert not names & values, names & values


def test_a_recorded_diff_with_a_credential_is_scrubbed_before_the_session_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clearml import Task

    from d2ops.clearml.secrets import scrub_recorded_diff
    from d2ops.clearml.session import enable_offline

    monkeypatch.delenv("CLEARML_PROC_MASTER_ID", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnSENTINELbPxRfiCY")
    # Task.init writes CLEARML_PROC_MASTER_ID, offline mode and the cache dir into os.environ: a later
    # test's subprocess would inherit them (and take itself for a child of this task: a stub task).
    saved_environ = dict(os.environ)
    enable_offline(tmp_path / "clearml")
    task = Task.init(project_name="d2ops-test", task_name="diff", reuse_last_task_id=False)
    try:
        task._wait_for_repo_detection(timeout=30)
        task.set_script(diff=DIFF)  # as ClearML records an uncommitted edit
        assert scrub_recorded_diff(task) == 1
        assert scrub_recorded_diff(task) == 0
        folder = Path(task.get_offline_mode_folder())
    finally:
        task.close()
        os.environ.clear()
        os.environ.update(saved_environ)
    recorded = json.loads((folder / "task.json").read_text())["script"]["diff"]
    assert "wJalrXUtnSENTINELbPxRfiCY" not in recorded and "+  max_iter: 400" in recorded


# --------------------------------------------------------------------------- one rule, every layer

#: Credentials whose names the old diff rule missed or that the issue lists (issue 21, part 4).
_NAMED = {
    "GITHUB_PAT": "ghp-SENTINEL-pat-0001",
    "DB_PASS": "db-SENTINEL-pass-0001",
    "PRIVATE_KEY_PEM": "pem-SENTINEL-line-0001",
    "WANDB_API_KEY": "wandb-SENTINEL-0001",
    "AZURE_STORAGE_KEY": "azure-SENTINEL-0001",
    "HF_TOKEN": "hf-SENTINEL-token-0001",
}


def test_the_diff_rule_is_the_config_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the recorded diff is scrubbed of and what a config refuses are decided by one function."""
    from d2ops import config_secrets
    from d2ops.clearml import secrets

    assert secrets.is_secret_name is config_secrets.is_secret_name
    assert secrets.SECRET_ENV is config_secrets.SECRET_ENV
    for name, value in _NAMED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-not-a-secret")
    monkeypatch.setenv("POSTGRES_PASSWORD_FILE", "/run/secrets/db-pass-file")  # where a secret is, not one
    values = known_secret_values()
    assert set(_NAMED.values()) <= values, sorted(set(_NAMED.values()) - values)
    assert not {"false-not-a-secret", "/run/secrets/db-pass-file"} & values


@pytest.mark.parametrize("name", sorted(_NAMED))
def test_docker_args_with_a_credential_never_reach_a_task(name: str) -> None:
    """with_agent_env builds every task's container arguments (controller, steps): it applies the rule
    itself, whatever the arguments came from."""
    from d2ops.clearml.cluster import with_agent_env
    from d2ops.config import ConfigError

    for spelling in (f"-e {name}={_NAMED[name]}", f"--env={name}={_NAMED[name]}", f"-e{name}={_NAMED[name]}"):
        with pytest.raises(ConfigError) as err:
            with_agent_env(f"--ipc=host {spelling}")
        assert name in str(err.value) and _NAMED[name] not in str(err.value)
        assert "must not carry credentials" in str(err.value)


def test_agent_env_is_recognised_in_every_spelling() -> None:
    from d2ops.clearml.cluster import with_agent_env

    assert with_agent_env("--env=CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL=0") == (
        "--env=CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL=0"
    )
    assert with_agent_env("-e GITHUB_PAT --ipc=host") == (
        "-e GITHUB_PAT --ipc=host -e CLEARML_AGENT_SKIP_PYTHON_ENV_INSTALL=1"
    )
