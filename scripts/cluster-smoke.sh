#!/usr/bin/env bash
# End-to-end smoke test of a d2ops cluster: the local Docker stack, or an existing ClearML server.
#
#   bash scripts/cluster-smoke.sh             # the stack, CPU only: every step on the `cpu` queue
#   GPU=1 bash scripts/cluster-smoke.sh       # with the GPU agent: train/evaluate/infer on `gpu`
#   KEEP=1 bash scripts/cluster-smoke.sh      # leave the stack running afterwards
#   CLEARML_API_HOST=http://server:8008 bash scripts/cluster-smoke.sh   # an existing server: no Docker
#
# Without CLEARML_API_HOST it brings up docker/docker-compose.yml, waits for the services to be healthy
# and runs scripts/cluster-setup.sh (secrets, laptop API keys, queues). With CLEARML_API_HOST set it uses
# that server as it is: no Docker command, no build, no compose, no cluster-setup.sh; its queues, agents
# and the buckets `datasets` and `clearml` at S3_ENDPOINT must exist. Then, either way: it generates the
# synthetic shapes dataset and uploads it to s3://$S3_ENDPOINT/datasets/, launches the pipeline remotely
# (controller on `services`, steps on the agents) with that dataset and output_uri
# s3://$S3_ENDPOINT/clearml/cluster-smoke, waits for the controller to finish and checks that the model
# was registered and published. On exit it tears the stack it started down (volumes included) unless KEEP=1.
#
# S3_ENDPOINT is one name for the laptop, the agents and the step containers alike (minio.local:9000:
# MinIO's alias on the compose network, and /etc/hosts on this machine), so the URIs launched are the
# ones uploaded to.
#
# The agents run the code of the git commit the pipeline is launched from, cloned from its remote
# (plus uncommitted changes): push the commit first (private repositories: CLEARML_AGENT_GIT_USER
# and CLEARML_AGENT_GIT_PASS in docker/.env). SKIP_GIT_CHECK=1 skips that check.
#
# Environment:
#   CLEARML_API_HOST     an existing ClearML API server (unset: start the Docker stack, http://localhost:8008)
#   CLEARML_WEB_HOST, CLEARML_FILES_HOST   taken as set (the stack: http://localhost:8080, :8081; with
#                        CLEARML_API_HOST and these unset, ClearML derives them from the API host)
#   CLEARML_API_ACCESS_KEY, CLEARML_API_SECRET_KEY   the laptop's API keys (unset: from ENV_FILE)
#   S3_ENDPOINT          host:port of the S3 endpoint in every s3:// URI (minio.local:9000); its keys are
#                        D2OPS_S3_ACCESS_KEY / D2OPS_S3_SECRET_KEY from ENV_FILE
#   D2OPS_IMAGE          the training image (unset: ENV_FILE's, else d2ops's default)
#   ENV_FILE (docker/.env), PY (.venv/bin/python), CONFIG (configs/smoke.yaml), PROJECT
#   (d2ops/cluster-smoke/<time>), TIMEOUT (3600 s for the pipeline), POLL_SECONDS (15), BUILD=1 (rebuild
#   the images), GPU, KEEP, SKIP_GIT_CHECK.
# Exit status: 0 when the pipeline completed and its model is published; 1 otherwise, after a line
# starting "[cluster-smoke] FAILED:" that says what failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
ENV_FILE=${ENV_FILE:-$ROOT/docker/.env}
CONFIG=${CONFIG:-configs/smoke.yaml}
TIMEOUT=${TIMEOUT:-3600}
POLL_SECONDS=${POLL_SECONDS:-15}
S3_ENDPOINT=${S3_ENDPOINT:-minio.local:9000}
RUN_ID=$(date +%Y%m%d-%H%M%S)
PROJECT=${PROJECT:-d2ops/cluster-smoke/$RUN_ID}
DATASET_PREFIX="datasets/shapes-smoke-$RUN_ID/"
OUTPUT_URI="s3://$S3_ENDPOINT/clearml/cluster-smoke"
# An existing server (CLEARML_API_HOST given): no Docker at all.
EXTERNAL=${CLEARML_API_HOST:+1}
WORK=""  # a private temporary folder, made by main

log() { echo "[cluster-smoke] $*"; }
die() { echo "[cluster-smoke] FAILED: $*" >&2; exit 1; }

compose() {
  local profiles=()
  if [ "${GPU:-0}" = "1" ]; then
    profiles=(--profile gpu)
  fi
  docker compose -f "$ROOT/docker/docker-compose.yml" --env-file "$ENV_FILE" "${profiles[@]}" "$@"
}

cleanup() {
  local status=$?
  if [ -n "$WORK" ]; then
    rm -rf "$WORK"
  fi
  if [ -n "${STACK_UP:-}" ]; then
    if [ "${KEEP:-0}" = "1" ]; then
      log "KEEP=1: the stack keeps running (web UI http://localhost:8080; stop it with: docker compose -f docker/docker-compose.yml --env-file $ENV_FILE down -v)"
    else
      if [ "$status" -ne 0 ]; then
        compose ps || true
        compose logs --tail 40 apiserver agent-cpu agent-services || true
      fi
      log "tearing the stack down"
      compose down -v --remove-orphans >/dev/null 2>&1 || true
    fi
  fi
  exit "$status"
}

preflight() {
  if [ -z "$EXTERNAL" ]; then
    command -v docker >/dev/null 2>&1 || die "docker is not installed"
    docker compose version >/dev/null 2>&1 || die "the docker compose plugin is missing (docker compose version)"
    docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info)"
  fi
  [ -x "$PY" ] || die "$PY not found: run 'make setup' first (or set PY)"
  if [ "${SKIP_GIT_CHECK:-0}" != "1" ] && [ -z "$(git branch -r --contains HEAD 2>/dev/null)" ]; then
    die "commit $(git rev-parse --short HEAD) is on no remote branch: the agents clone the repository, so push it first (or SKIP_GIT_CHECK=1)"
  fi
}

# env_value KEY: KEY's value in ENV_FILE (empty when the file or the key is missing).
env_value() {
  [ -f "$ENV_FILE" ] || return 0
  grep -E "^$1=" "$ENV_FILE" | tail -n 1 | cut -d= -f2- || true
}

build_images() {
  local image
  for image in "$(env_value D2OPS_IMAGE)" "$(env_value D2OPS_AGENT_IMAGE)"; do
    if [ "${BUILD:-0}" = "1" ] || ! docker image inspect "$image" >/dev/null 2>&1; then
      log "building the images (d2ops training image and clearml-agent)"
      compose --profile build build d2ops-image agent-cpu
      return
    fi
  done
}

start_stack() {
  log "starting the stack (waiting for every service to be healthy)"
  STACK_UP=1
  compose up -d --wait --wait-timeout 900 || die "the stack did not become healthy (see the service status above)"
  bash "$ROOT/scripts/cluster-setup.sh"
}

# The laptop side: the server's endpoints and API keys, and the S3 keys for S3_ENDPOINT in a private
# clearml.conf (the same host:port as every URI launched).
client_environment() {
  export CLEARML_API_HOST=${CLEARML_API_HOST:-http://localhost:8008}
  if [ -z "$EXTERNAL" ]; then
    export CLEARML_WEB_HOST=${CLEARML_WEB_HOST:-http://localhost:8080}
    export CLEARML_FILES_HOST=${CLEARML_FILES_HOST:-http://localhost:8081}
  fi
  CLEARML_API_ACCESS_KEY=${CLEARML_API_ACCESS_KEY:-$(env_value CLEARML_API_ACCESS_KEY)}
  CLEARML_API_SECRET_KEY=${CLEARML_API_SECRET_KEY:-$(env_value CLEARML_API_SECRET_KEY)}
  [ -n "$CLEARML_API_ACCESS_KEY" ] && [ -n "$CLEARML_API_SECRET_KEY" ] \
    || die "no ClearML API keys: set CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY, or run scripts/cluster-setup.sh (writes them to $ENV_FILE)"
  export CLEARML_API_ACCESS_KEY CLEARML_API_SECRET_KEY
  local s3_key s3_secret
  s3_key=$(env_value D2OPS_S3_ACCESS_KEY)
  s3_secret=$(env_value D2OPS_S3_SECRET_KEY)
  [ -n "$s3_key" ] && [ -n "$s3_secret" ] || die "no S3 keys: D2OPS_S3_ACCESS_KEY and D2OPS_S3_SECRET_KEY must be set in $ENV_FILE"
  D2OPS_IMAGE=${D2OPS_IMAGE:-$(env_value D2OPS_IMAGE)}
  if [ -n "$D2OPS_IMAGE" ]; then
    export D2OPS_IMAGE  # clearml.docker_image of the configs that leave it unset
  fi
  export CLEARML_CONFIG_FILE=$WORK/clearml.conf
  (
    umask 077
    cat >"$CLEARML_CONFIG_FILE" <<CONF
sdk.aws.s3.credentials: [
  {host: "$S3_ENDPOINT", key: "$s3_key", secret: "$s3_secret", multipart: false, secure: false}
]
sdk.development.report_use_subprocess: false
CONF
  )
  log "server $CLEARML_API_HOST, S3 s3://$S3_ENDPOINT/, image ${D2OPS_IMAGE:-(d2ops default)}"
}

upload_dataset() {
  log "generating the shapes dataset and uploading it to s3://$S3_ENDPOINT/$DATASET_PREFIX"
  DATASET_DIR="$WORK/shapes" DATASET_URI="s3://$S3_ENDPOINT/$DATASET_PREFIX" "$PY" - <<'PY' || die "could not upload the dataset to s3://$S3_ENDPOINT/ (does its bucket 'datasets' exist, and does the name resolve here?)"
import os
from d2ops.clearml import install
from d2ops.data.synthetic import generate_shapes_dataset
from d2ops.storage.s3 import upload

install()  # d2ops's S3 client takes the keys for S3_ENDPOINT from the clearml.conf written above

root = generate_shapes_dataset(os.environ["DATASET_DIR"])
stats = upload(root, os.environ["DATASET_URI"], progress=False)
print(f"[cluster-smoke] uploaded {stats.to_dict()}")
PY
}

run_pipeline() {
  local args=(--config "$CONFIG"
    --dataset-uri "s3://$S3_ENDPOINT/$DATASET_PREFIX"
    --set "clearml.project=$PROJECT"
    --set "clearml.output_uri=$OUTPUT_URI")
  if [ "${GPU:-0}" != "1" ]; then
    args+=(--set clearml.queues.train=cpu --set clearml.queues.evaluate=cpu --set clearml.queues.infer=cpu)
  fi
  log "launching the pipeline remotely (project $PROJECT)"
  "$PY" pipelines/run_pipeline.py "${args[@]}" | tee "$WORK/launch.out" \
    || die "the launch was refused or failed (its messages are above)"
  # run_pipeline.py prints {"pipeline_task_id": ..., "project": ...} before it hands the controller over
  PIPELINE_ID=$(sed -n 's/.*"pipeline_task_id": *"\([0-9A-Za-z_-]*\)".*/\1/p' "$WORK/launch.out" | tail -n 1)
}

# Wait for the pipeline controller task; fail with its status message and log link. The controller lives
# in <project>/.pipelines/<name>, a hidden sub-project: it is looked up by the id run_pipeline.py printed,
# else by a query that includes sub-projects and hidden tasks (clearml-server's tasks.get_all leaves both
# out unless asked).
wait_for_pipeline() {
  log "waiting up to ${TIMEOUT}s for the pipeline to finish"
  PROJECT="$PROJECT" TIMEOUT="$TIMEOUT" POLL_SECONDS="$POLL_SECONDS" PIPELINE_ID="${PIPELINE_ID:-}" "$PY" - <<'PY'
import os, sys, time
from clearml import Task

project, deadline = os.environ["PROJECT"], time.monotonic() + float(os.environ["TIMEOUT"])
poll = float(os.environ.get("POLL_SECONDS") or 15)
pipeline_id = os.environ.get("PIPELINE_ID", "")


def controllers():
    # projects.get_all (search_hidden) finds the project; tasks.get_all with include_subprojects adds
    # <project>/.pipelines/<name>, search_hidden the hidden controller (ClearML SDK 2.1: extra request
    # fields pass only with _allow_extra_fields_)
    return Task.query_tasks(
        project_name=project,
        task_filter={
            "type": ["controller"],
            "search_hidden": True,
            "include_subprojects": True,
            "_allow_extra_fields_": True,
            "order_by": ["-last_update"],
        },
    )


while True:
    found = [pipeline_id] if pipeline_id else controllers()
    if found or time.monotonic() >= deadline:
        break
    time.sleep(min(poll, 5.0))
if not found:
    sys.exit(f"[cluster-smoke] FAILED: no pipeline controller task in project {project} or its sub-projects")
task, last = Task.get_task(task_id=found[0]), None
print(f"[cluster-smoke] pipeline controller {task.id} in project {task.get_project_name()}", flush=True)
while True:
    status = task.get_status()
    if status != last:
        print(f"[cluster-smoke] pipeline {task.id}: {status}", flush=True)
        last = status
    if status in ("completed", "failed", "stopped", "closed", "published"):
        break
    if time.monotonic() >= deadline:
        sys.exit(f"[cluster-smoke] FAILED: the pipeline is still {status!r} after {os.environ['TIMEOUT']}s ({task.get_output_log_web_page()})")
    time.sleep(poll)
    task.reload()
url = task.get_output_log_web_page()
if last != "completed":
    message = task.data.status_message or task.data.status_reason or ""
    sys.exit(f"[cluster-smoke] FAILED: pipeline ended {last!r} {message} (log: {url})")
print(f"[cluster-smoke] pipeline completed: {url}")
PY
}

check_model() {
  PROJECT="$PROJECT" CONFIG="$CONFIG" "$PY" - <<'PY'
import os, sys
from clearml import Model
from d2ops.config import load_config

cfg = load_config(os.environ["CONFIG"])
name, tags = cfg.registry.model_name, list(cfg.registry.tags)
published = Model.query_models(project_name=os.environ["PROJECT"], model_name=name, tags=tags, only_published=True)
if not published:
    anything = Model.query_models(project_name=os.environ["PROJECT"], model_name=name)
    why = "registered but not published: the quality gate failed" if anything else "no model registered"
    sys.exit(f"[cluster-smoke] FAILED: {why} ({name!r}, tags {tags}, project {os.environ['PROJECT']})")
model = published[0]
print(f"[cluster-smoke] published model {model.name} {model.id}: {model.url}")
PY
}

main() {
  WORK=$(mktemp -d)
  trap cleanup EXIT
  preflight
  if [ -z "$EXTERNAL" ]; then
    bash "$ROOT/scripts/cluster-setup.sh" init
    build_images
    start_stack
  else
    log "using the ClearML server at $CLEARML_API_HOST (no Docker)"
  fi
  client_environment
  upload_dataset
  run_pipeline
  wait_for_pipeline
  check_model
  log "OK"
}

# Sourced (tests: `source scripts/cluster-smoke.sh; wait_for_pipeline`), it only defines the functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
