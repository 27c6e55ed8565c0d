#!/usr/bin/env bash
# Prepare the local d2ops cluster of docker/docker-compose.yml.
#
#   bash scripts/cluster-setup.sh init      # before `docker compose up`: docker/.env with fresh secrets
#   bash scripts/cluster-setup.sh           # after it: checks minio.local, laptop API keys, the queues
#   bash scripts/cluster-setup.sh weights   # the COCO weights the shipped configs start from, into MinIO
#
# init copies docker/.env.example to docker/.env (mode 600) and fills each empty secret with a random
# value. The rest talks to the apiserver's REST API as the agents' identity (pre-seeded into the
# server from docker/.env, admin role): auth.login, then auth.create_credentials for the laptop's
# CLEARML_API_ACCESS_KEY / CLEARML_API_SECRET_KEY (kept if they still log in), then queues.create
# for each missing queue. Safe to re-run. Secrets never appear on a command line (curl reads them
# from standard input) and are never printed.
#
# S3 has one name for the laptop, the agents and the step containers: minio.local:9000 (MinIO's alias on
# the compose network). This machine must map it in /etc/hosts; setup and weights check that it resolves
# and answers, and print the line to add when it does not.
#
# weights mirrors the detectron2 model zoo's COCO weights that configs/balloon.yaml and roboflow.yaml name
# to s3://minio.local:9000/models/detectron2/<the zoo's path> (workers cannot reach the model zoo). Each
# file comes from D2OPS_WEIGHTS_DIR when it is there (by the zoo's path or by its file name), else it is
# downloaded once into WEIGHTS_CACHE; it is uploaded with d2ops's S3 uploader as D2OPS_S3_ACCESS_KEY of
# docker/.env. A file already in MinIO is left alone: safe to re-run.
#
# Environment: ENV_FILE (docker/.env), CLEARML_API (http://localhost:8008),
#              QUEUES ("gpu cpu services"), WAIT_SECONDS (300), S3_ENDPOINT (minio.local:9000),
#              PY (.venv/bin/python, for weights), D2OPS_WEIGHTS_DIR, WEIGHTS_CACHE
#              (~/.cache/d2ops/weights), MODEL_ZOO_URL (https://dl.fbaipublicfiles.com/detectron2).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENV_FILE=${ENV_FILE:-$ROOT/docker/.env}
ENV_EXAMPLE=$ROOT/docker/.env.example
CLEARML_API=${CLEARML_API:-http://localhost:8008}
QUEUES=${QUEUES:-gpu cpu services}
WAIT_SECONDS=${WAIT_SECONDS:-300}
SECRETS=(CLEARML_TOKEN_SECRET CLEARML_AGENT_ACCESS_KEY CLEARML_AGENT_SECRET_KEY
  MINIO_ROOT_USER MINIO_ROOT_PASSWORD D2OPS_S3_ACCESS_KEY D2OPS_S3_SECRET_KEY)
S3_ENDPOINT=${S3_ENDPOINT:-minio.local:9000}
PY=${PY:-$ROOT/.venv/bin/python}
WEIGHTS_CACHE=${WEIGHTS_CACHE:-${XDG_CACHE_HOME:-${HOME:-$ROOT}/.cache}/d2ops/weights}
MODEL_ZOO_URL=${MODEL_ZOO_URL:-https://dl.fbaipublicfiles.com/detectron2}
# The COCO-trained weights the shipped configs name, by their path in the detectron2 model zoo; each goes
# to s3://$S3_ENDPOINT/models/detectron2/<path> (a test keeps this list and the configs' model.weights equal).
WEIGHTS=(
  COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl  # configs/balloon.yaml
  COCO-Detection/faster_rcnn_R_50_FPN_3x/137849458/model_final_280758.pkl           # configs/roboflow.yaml
)

log() { echo "[cluster-setup] $*"; }
die() { echo "[cluster-setup] ERROR: $*" >&2; exit 1; }

require() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is needed but not installed"
  done
}

# env_get KEY: the value of KEY in ENV_FILE (empty if absent).
env_get() {
  python3 - "$ENV_FILE" "$1" <<'PY'
import sys
path, key = sys.argv[1], sys.argv[2]
for line in open(path, encoding="utf-8"):
    name, sep, value = line.rstrip("\n").partition("=")
    if sep and name.strip() == key:
        print(value.strip())
        break
PY
}

# env_set KEY: replace or append KEY=<value read from stdin> in ENV_FILE, keeping everything else.
env_set() {
  python3 -c '
import os, sys
path, key, value = sys.argv[1], sys.argv[2], sys.stdin.read().strip()
lines = open(path, encoding="utf-8").read().splitlines()
for i, line in enumerate(lines):
    if line.partition("=")[0].strip() == key:
        lines[i] = f"{key}={value}"
        break
else:
    lines.append(f"{key}={value}")
with open(path + ".tmp", "w", encoding="utf-8") as fh:
    fh.write("\n".join(lines) + "\n")
os.chmod(path + ".tmp", 0o600)
os.replace(path + ".tmp", path)
' "$ENV_FILE" "$1"
}

random_secret() { python3 -c 'import secrets; print(secrets.token_hex(20))'; }

init_env() {
  if [ ! -f "$ENV_FILE" ]; then
    [ -f "$ENV_EXAMPLE" ] || die "$ENV_EXAMPLE is missing"
    (umask 077 && cp "$ENV_EXAMPLE" "$ENV_FILE")
    log "created $ENV_FILE from docker/.env.example"
  fi
  chmod 600 "$ENV_FILE"
  local key filled=0
  for key in "${SECRETS[@]}"; do
    if [ -z "$(env_get "$key")" ]; then
      random_secret | env_set "$key"
      filled=$((filled + 1))
    fi
  done
  log "$ENV_FILE: $filled secret(s) generated, ${#SECRETS[@]} in place"
}

# json_field PATH: print a field of the JSON document on stdin (dot-separated PATH), or fail with
# the server's message when the call did not succeed.
json_field() {
  python3 -c '
import json, sys
try:
    doc = json.load(sys.stdin)
except ValueError:
    sys.exit("not a JSON reply: is CLEARML_API the apiserver (port 8008)?")
meta = doc.get("meta") or {}
if meta.get("result_code", 200) != 200:
    sys.exit("API call failed: {} {}".format(meta.get("result_code"), meta.get("result_msg")))
value = doc
for part in sys.argv[1].split("."):
    value = value.get(part) if isinstance(value, dict) else None
print(json.dumps(value) if isinstance(value, (dict, list)) else ("" if value is None else value))
' "$1"
}

wait_for_api() {
  local deadline=$((SECONDS + WAIT_SECONDS))
  until curl -fsS "$CLEARML_API/debug.ping" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "no apiserver at $CLEARML_API/debug.ping after ${WAIT_SECONDS}s (docker compose ps; docker compose logs apiserver)"
    sleep 3
  done
  log "apiserver is up at $CLEARML_API"
}

# login KEY SECRET: print a session token (basic auth read by curl from stdin, not argv).
login() {
  printf 'user = "%s:%s"\n' "$1" "$2" \
    | curl -sS -K - -X POST -H "Content-Type: application/json" --data '{}' "$CLEARML_API/auth.login" \
    | json_field data.token
}

# api ENDPOINT JSON: call the API with the session token in TOKEN, print the reply.
api() {
  printf 'header = "Authorization: Bearer %s"\n' "$TOKEN" \
    | curl -sS -K - -X POST -H "Content-Type: application/json" --data "$2" "$CLEARML_API/$1"
}

ensure_laptop_credentials() {
  local key secret reply
  key=$(env_get CLEARML_API_ACCESS_KEY)
  secret=$(env_get CLEARML_API_SECRET_KEY)
  if [ -n "$key" ] && [ -n "$secret" ] && login "$key" "$secret" >/dev/null 2>&1; then
    log "laptop credentials in $ENV_FILE are valid (access key $key)"
    return
  fi
  reply=$(api auth.create_credentials '{}')
  key=$(json_field data.credentials.access_key <<<"$reply")
  secret=$(json_field data.credentials.secret_key <<<"$reply")
  [ -n "$key" ] && [ -n "$secret" ] || die "auth.create_credentials returned no credentials"
  env_set CLEARML_API_ACCESS_KEY <<<"$key"
  env_set CLEARML_API_SECRET_KEY <<<"$secret"
  log "created laptop credentials (access key $key) in $ENV_FILE"
}

ensure_queues() {
  local queue existing
  for queue in $QUEUES; do
    existing=$(api queues.get_all "{\"name\": \"^${queue}\$\", \"only_fields\": [\"id\", \"name\"]}" \
      | json_field data.queues)
    if [ "$existing" != "[]" ] && [ -n "$existing" ]; then
      log "queue '$queue' exists"
    else
      api queues.create "{\"name\": \"$queue\"}" | json_field data.id >/dev/null
      log "queue '$queue' created"
    fi
  done
}

# check_s3_name: S3_ENDPOINT's host resolves on this machine and something listens there, or fail with the
# /etc/hosts line to add.
check_s3_name() {
  local host=${S3_ENDPOINT%:*} port=${S3_ENDPOINT##*:} why
  [ "$host" != "$S3_ENDPOINT" ] || die "S3_ENDPOINT '$S3_ENDPOINT' needs its port (host:port, e.g. minio.local:9000)"
  why=$(python3 - "$host" "$port" <<'PY' 2>&1
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
except OSError:
    sys.exit("unresolved")
try:
    socket.create_connection((host, port), timeout=5).close()
except OSError as err:
    sys.exit(f"closed: {err}")
PY
  ) || {
    case "$why" in
      unresolved*)
        die "'$host' does not resolve on this machine, and every s3:// URI of the stack uses it. Add this line to /etc/hosts (with the address of the machine that runs MinIO where it is not this one):
    127.0.0.1 $host"
        ;;
      *) die "nothing answers at $S3_ENDPOINT (${why#closed: }): is MinIO up? (docker compose -f docker/docker-compose.yml --env-file $ENV_FILE ps minio)" ;;
    esac
  }
  log "S3 endpoint $S3_ENDPOINT resolves and answers"
}

# weight_file ZOO_PATH: print a local copy of a model-zoo file: from D2OPS_WEIGHTS_DIR, else downloaded
# (once) into WEIGHTS_CACHE. Checked to be a pickle, not an error page or a Git LFS pointer.
weight_file() {
  local path=$1 name file=""
  name=$(basename "$path")
  if [ -n "${D2OPS_WEIGHTS_DIR:-}" ]; then
    for file in "$D2OPS_WEIGHTS_DIR/$path" "$D2OPS_WEIGHTS_DIR/$name"; do
      [ -f "$file" ] && break
      file=""
    done
  fi
  if [ -z "$file" ]; then
    file="$WEIGHTS_CACHE/$path"
    if [ ! -f "$file" ]; then
      require curl
      mkdir -p "$(dirname "$file")"
      log "downloading $MODEL_ZOO_URL/$path" >&2
      curl -fsSL --retry 3 --retry-delay 2 -o "$file.part" "$MODEL_ZOO_URL/$path" \
        || die "could not download $MODEL_ZOO_URL/$path: put the file in a folder and set D2OPS_WEIGHTS_DIR to it"
      mv "$file.part" "$file"
    fi
  fi
  python3 - "$file" <<'PY' || die "$file is not a detectron2 .pkl (a pickle): remove it and run again"
import sys
with open(sys.argv[1], "rb") as fh:
    sys.exit(0 if fh.read(1) == b"\x80" else 1)
PY
  echo "$file"
}

# s3_weights ACTION URI [FILE]: "exists" (exit 0 if the object is there, 1 if not) or "upload", through
# d2ops's S3 client with the S3 identity of ENV_FILE.
s3_weights() {
  AWS_ACCESS_KEY_ID=$(env_get D2OPS_S3_ACCESS_KEY) AWS_SECRET_ACCESS_KEY=$(env_get D2OPS_S3_SECRET_KEY) \
    "$PY" - "$@" <<'PY'
import sys
from pathlib import Path

from d2ops.storage.s3 import StorageError, make_s3_client, parse_s3_uri, upload

action, uri = sys.argv[1], sys.argv[2]
try:
    if action == "exists":
        loc = parse_s3_uri(uri)
        try:
            make_s3_client(loc, max_pool_connections=2).head_object(Bucket=loc.bucket, Key=loc.prefix)
        except Exception as err:
            if getattr(err, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                sys.exit(1)
            raise
    else:
        stats = upload(Path(sys.argv[3]), uri, progress=False)
        print(f"[cluster-setup] uploaded {uri} ({stats.bytes_transferred} bytes)")
except StorageError as err:
    sys.exit(f"[cluster-setup] ERROR: {err}")
except Exception as err:
    sys.exit(f"[cluster-setup] ERROR: {uri}: {type(err).__name__}: {err}")
PY
}

upload_weights() {
  [ -x "$PY" ] || die "$PY not found: weights uploads with d2ops (make setup, or set PY to a Python with d2ops)"
  [ -n "$(env_get D2OPS_S3_ACCESS_KEY)" ] || die "D2OPS_S3_ACCESS_KEY is empty in $ENV_FILE"
  check_s3_name
  local path uri file status
  for path in "${WEIGHTS[@]}"; do
    uri="s3://$S3_ENDPOINT/models/detectron2/$path"
    status=0
    s3_weights exists "$uri" || status=$?
    if [ "$status" -eq 0 ]; then
      log "$uri is there"
      continue
    fi
    [ "$status" -eq 1 ] || die "could not look at $uri (the message above)"
    file=$(weight_file "$path")
    s3_weights upload "$uri" "$file" || die "could not upload $uri (the message above; minio-init creates the bucket 'models')"
  done
  log "done: the COCO weights the configs name are in s3://$S3_ENDPOINT/models/detectron2/"
}

main() {
  require python3
  init_env
  case "${1:-}" in
    init) return ;;
    weights)
      upload_weights
      return
      ;;
    "") ;;
    *) die "unknown argument '$1' (use: init, weights, or nothing)" ;;
  esac
  require curl
  check_s3_name
  wait_for_api
  local agent_key agent_secret
  agent_key=$(env_get CLEARML_AGENT_ACCESS_KEY)
  agent_secret=$(env_get CLEARML_AGENT_SECRET_KEY)
  local no_login="the agents' credentials (CLEARML_AGENT_ACCESS_KEY in $ENV_FILE) do not log in: was the stack started with this env file? (docker compose --env-file $ENV_FILE up -d)"
  TOKEN=$(login "$agent_key" "$agent_secret") || die "$no_login"
  [ -n "$TOKEN" ] || die "$no_login"
  ensure_laptop_credentials
  ensure_queues
  log "done: the agents listen on $QUEUES; use the CLEARML_API_* keys of $ENV_FILE on this machine"
  log "the COCO weights of configs/balloon.yaml and roboflow.yaml: bash scripts/cluster-setup.sh weights"
}

main "$@"
