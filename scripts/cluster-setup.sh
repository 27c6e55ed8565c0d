#!/usr/bin/env bash
# Prepare the local d2ops cluster of docker/docker-compose.yml.
#
#   bash scripts/cluster-setup.sh init   # before `docker compose up`: docker/.env with fresh secrets
#   bash scripts/cluster-setup.sh        # after it: laptop API keys and the queues (runs init too)
#
# init copies docker/.env.example to docker/.env (mode 600) and fills each empty secret with a random
# value. The rest talks to the apiserver's REST API as the agents' identity (pre-seeded into the
# server from docker/.env, admin role): auth.login, then auth.create_credentials for the laptop's
# CLEARML_API_ACCESS_KEY / CLEARML_API_SECRET_KEY (kept if they still log in), then queues.create
# for each missing queue. Safe to re-run. Secrets never appear on a command line (curl reads them
# from standard input) and are never printed.
#
# Environment: ENV_FILE (docker/.env), CLEARML_API (http://localhost:8008),
#              QUEUES ("gpu cpu services"), WAIT_SECONDS (300).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENV_FILE=${ENV_FILE:-$ROOT/docker/.env}
ENV_EXAMPLE=$ROOT/docker/.env.example
CLEARML_API=${CLEARML_API:-http://localhost:8008}
QUEUES=${QUEUES:-gpu cpu services}
WAIT_SECONDS=${WAIT_SECONDS:-300}
SECRETS=(CLEARML_TOKEN_SECRET CLEARML_AGENT_ACCESS_KEY CLEARML_AGENT_SECRET_KEY
  MINIO_ROOT_USER MINIO_ROOT_PASSWORD D2OPS_S3_ACCESS_KEY D2OPS_S3_SECRET_KEY)

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

main() {
  require python3
  init_env
  if [ "${1:-}" = "init" ]; then
    return
  fi
  [ -z "${1:-}" ] || die "unknown argument '$1' (use: init, or nothing)"
  require curl
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
}

main "$@"
