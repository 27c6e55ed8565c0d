#!/usr/bin/env bash
# End-to-end smoke test of the local cluster (needs Docker with the compose plugin; GPU optional).
#
#   bash scripts/cluster-smoke.sh             # CPU only: every step on the `cpu` queue
#   GPU=1 bash scripts/cluster-smoke.sh       # with the GPU agent: train/evaluate/infer on `gpu`
#   KEEP=1 bash scripts/cluster-smoke.sh      # leave the stack running afterwards
#
# It brings up docker/docker-compose.yml, waits for the services to be healthy, runs
# scripts/cluster-setup.sh (secrets, laptop API keys, queues), generates the synthetic shapes
# dataset and uploads it to MinIO, launches the pipeline remotely (controller on `services`, steps
# in the d2ops image on the agents), waits for the controller to finish and checks that the model
# was registered and published. On exit it tears the stack down (volumes included) unless KEEP=1.
#
# The agents run the code of the git commit the pipeline is launched from, cloned from its remote
# (plus uncommitted changes): push the commit first (private repositories: CLEARML_AGENT_GIT_USER
# and CLEARML_AGENT_GIT_PASS in docker/.env). SKIP_GIT_CHECK=1 skips that check.
#
# Environment: PY (.venv/bin/python), ENV_FILE (docker/.env), CONFIG (configs/smoke.yaml),
#              TIMEOUT (3600 s for the pipeline), BUILD=1 (rebuild the images), GPU, KEEP.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
ENV_FILE=${ENV_FILE:-$ROOT/docker/.env}
CONFIG=${CONFIG:-configs/smoke.yaml}
TIMEOUT=${TIMEOUT:-3600}
RUN_ID=$(date +%Y%m%d-%H%M%S)
PROJECT="d2ops/cluster-smoke/$RUN_ID"
DATASET_PREFIX="datasets/shapes-smoke-$RUN_ID/"
WORK=$(mktemp -d)

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
  rm -rf "$WORK"
  if [ "${KEEP:-0}" = "1" ]; then
    log "KEEP=1: the stack keeps running (web UI http://localhost:8080; stop it with: docker compose -f docker/docker-compose.yml --env-file $ENV_FILE down -v)"
  elif [ -n "${STACK_UP:-}" ]; then
    if [ "$status" -ne 0 ]; then
      compose ps || true
      compose logs --tail 40 apiserver agent-cpu agent-services || true
    fi
    log "tearing the stack down"
    compose down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  exit "$status"
}
trap cleanup EXIT

preflight() {
  command -v docker >/dev/null 2>&1 || die "docker is not installed"
  docker compose version >/dev/null 2>&1 || die "the docker compose plugin is missing (docker compose version)"
  docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info)"
  [ -x "$PY" ] || die "$PY not found: run 'make setup' first (or set PY)"
  if [ "${SKIP_GIT_CHECK:-0}" != "1" ] && [ -z "$(git branch -r --contains HEAD 2>/dev/null)" ]; then
    die "commit $(git rev-parse --short HEAD) is on no remote branch: the agents clone the repository, so push it first (or SKIP_GIT_CHECK=1)"
  fi
}

env_value() { grep -E "^$1=" "$ENV_FILE" | tail -n 1 | cut -d= -f2-; }

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

# The laptop side: API keys from docker/.env, MinIO through its published port.
client_environment() {
  export CLEARML_API_HOST=http://localhost:8008
  export CLEARML_WEB_HOST=http://localhost:8080
  export CLEARML_FILES_HOST=http://localhost:8081
  CLEARML_API_ACCESS_KEY=$(env_value CLEARML_API_ACCESS_KEY)
  CLEARML_API_SECRET_KEY=$(env_value CLEARML_API_SECRET_KEY)
  export CLEARML_API_ACCESS_KEY CLEARML_API_SECRET_KEY
  export CLEARML_CONFIG_FILE=$WORK/clearml.conf
  (
    umask 077
    cat >"$CLEARML_CONFIG_FILE" <<CONF
sdk.aws.s3.credentials: [
  {host: "localhost:9000", key: "$(env_value D2OPS_S3_ACCESS_KEY)", secret: "$(env_value D2OPS_S3_SECRET_KEY)", multipart: false, secure: false}
]
sdk.development.report_use_subprocess: false
CONF
  )
}

upload_dataset() {
  log "generating the shapes dataset and uploading it to s3://localhost:9000/$DATASET_PREFIX"
  DATASET_DIR="$WORK/shapes" DATASET_URI="s3://localhost:9000/$DATASET_PREFIX" "$PY" - <<'PY'
import os
from d2ops.data.synthetic import generate_shapes_dataset
from d2ops.storage.s3 import upload

root = generate_shapes_dataset(os.environ["DATASET_DIR"])
stats = upload(root, os.environ["DATASET_URI"], progress=False)
print(f"[cluster-smoke] uploaded {stats.to_dict()}")
PY
}

run_pipeline() {
  local args=(--config "$CONFIG"
    --dataset-uri "s3://minio:9000/$DATASET_PREFIX"
    --set "clearml.project=$PROJECT"
    --set "clearml.docker_image=$(env_value D2OPS_IMAGE)"
    --set "clearml.output_uri=s3://minio:9000/models/cluster-smoke")
  if [ "${GPU:-0}" != "1" ]; then
    args+=(--set clearml.queues.train=cpu --set clearml.queues.evaluate=cpu --set clearml.queues.infer=cpu)
  fi
  log "launching the pipeline remotely (project $PROJECT)"
  "$PY" pipelines/run_pipeline.py "${args[@]}"
}

# Wait for the pipeline controller task; fail with its status message and log link.
wait_for_pipeline() {
  log "waiting up to ${TIMEOUT}s for the pipeline to finish"
  PROJECT="$PROJECT" TIMEOUT="$TIMEOUT" "$PY" - <<'PY'
import os, sys, time
from clearml import Task

project, deadline = os.environ["PROJECT"], time.monotonic() + float(os.environ["TIMEOUT"])
controllers = []
while not controllers and time.monotonic() < deadline:
    controllers = Task.get_tasks(
        project_name=project,
        task_filter={"type": ["controller"], "search_hidden": True, "order_by": ["-last_update"]},
    ) or Task.get_tasks(
        project_name=f"{project}/.pipelines",
        task_filter={"type": ["controller"], "search_hidden": True, "order_by": ["-last_update"]},
    )
    time.sleep(5)
if not controllers:
    sys.exit(f"[cluster-smoke] FAILED: no pipeline controller task in project {project}")
task, last = controllers[0], None
while time.monotonic() < deadline:
    status = task.get_status()
    if status != last:
        print(f"[cluster-smoke] pipeline {task.id}: {status}", flush=True)
        last = status
    if status in ("completed", "failed", "stopped", "closed"):
        break
    time.sleep(15)
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
  preflight
  bash "$ROOT/scripts/cluster-setup.sh" init
  build_images
  start_stack
  client_environment
  upload_dataset
  run_pipeline
  wait_for_pipeline
  check_model
  log "OK"
}

main "$@"
