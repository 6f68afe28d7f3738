#!/usr/bin/env bash
# Starts the dev container (systemd as PID 1, the host's Docker socket mounted) and waits until
# metald answers /health; used by `make docker-dev-up` and by scripts/dev-e2e.sh.
#
#   scripts/dev-run.sh NAME IMAGE [extra `docker run` arguments...]
#
# What systemd needs from the engine: `--privileged` where the host allows it, otherwise the
# minimal set: --cap-add SYS_ADMIN, seccomp unconfined (AppArmor too where it is enabled), tmpfs
# on /run, /run/lock and /tmp, and the cgroup tree (read-only on cgroup v1; on cgroup v2 the
# host's cgroup namespace, writable). Environment:
#   DEV_RUN_FLAGS       replaces that choice entirely (e.g. DEV_RUN_FLAGS=--privileged)
#   DEV_PUBLISH         -p argument for metald's port (default 127.0.0.1:8080:8080;
#                       127.0.0.1::8080 picks a free host port)
#   DEV_ENV_FILE        a file mounted as /etc/default/unkey-deploy.local (overrides; optional)
#   DEV_HEALTH_TIMEOUT  seconds to wait for /health (default 120)
#   DOCKER_SOCK         the host's engine socket (default /var/run/docker.sock)
set -euo pipefail

name="${1:?usage: dev-run.sh NAME IMAGE [docker run args...]}"
image="${2:?usage: dev-run.sh NAME IMAGE [docker run args...]}"
shift 2
publish="${DEV_PUBLISH:-127.0.0.1:8080:8080}"
timeout="${DEV_HEALTH_TIMEOUT:-120}"
sock="${DOCKER_SOCK:-/var/run/docker.sock}"

say() { echo "dev-run: $*"; }

docker image inspect "$image" >/dev/null 2>&1 || {
  echo "dev-run: image $image not found (make docker-dev-build)" >&2; exit 1; }
[ -S "$sock" ] || { echo "dev-run: no Docker socket at $sock" >&2; exit 1; }

if [ -n "$(docker ps -aq --filter "name=^/${name}\$")" ]; then
  say "removing the previous container $name"
  docker rm -f "$name" >/dev/null
fi

common=(--detach --name "$name" --hostname "$name"
        --volume "${sock}:/var/run/docker.sock"
        --publish "$publish"
        --tmpfs /run --tmpfs /run/lock --tmpfs /tmp)
if [ -n "${DEV_ENV_FILE:-}" ]; then
  [ -f "$DEV_ENV_FILE" ] || { echo "dev-run: DEV_ENV_FILE $DEV_ENV_FILE not found" >&2; exit 1; }
  common+=(--volume "$(cd "$(dirname "$DEV_ENV_FILE")" && pwd)/$(basename "$DEV_ENV_FILE"):/etc/default/unkey-deploy.local:ro")
fi

minimal_flags() {
  local cgroup security
  cgroup="$(docker info --format '{{.CgroupVersion}}' 2>/dev/null || echo 1)"
  security="$(docker info --format '{{json .SecurityOptions}}' 2>/dev/null || true)"
  echo --cap-add SYS_ADMIN --security-opt seccomp=unconfined
  case "$security" in *apparmor*) echo --security-opt apparmor=unconfined ;; esac
  if [ "$cgroup" = 2 ]; then
    echo --cgroupns host --volume /sys/fs/cgroup:/sys/fs/cgroup:rw
  else
    echo --volume /sys/fs/cgroup:/sys/fs/cgroup:ro
  fi
}

started=""
if [ -n "${DEV_RUN_FLAGS:-}" ]; then
  mode="DEV_RUN_FLAGS ($DEV_RUN_FLAGS)"
  # shellcheck disable=SC2086 # DEV_RUN_FLAGS is a list of words
  docker run $DEV_RUN_FLAGS "${common[@]}" "$@" "$image" >/dev/null && started=1
else
  mode="--privileged"
  if err="$(docker run --privileged "${common[@]}" "$@" "$image" 2>&1 >/dev/null)"; then
    started=1
  else
    reason="$(grep -o 'unable to apply caps[^:]*\|[^:]*denied[^:]*' <<<"$err" | head -n1)"
    say "--privileged did not start here (${reason:-$(head -n1 <<<"$err")}); trying the minimal set"
    docker rm -f "$name" >/dev/null 2>&1 || true
    read -r -a flags <<<"$(minimal_flags | tr '\n' ' ')"
    mode="minimal (${flags[*]})"
    docker run "${flags[@]}" "${common[@]}" "$@" "$image" >/dev/null && started=1
  fi
fi
[ -n "$started" ] || { echo "dev-run: docker run failed ($mode)" >&2; exit 1; }
say "started $name from $image with $mode"

# The host side of metald's port.
published="$(docker port "$name" 8080/tcp | head -n1)"
where=""
case "$published" in 0.0.0.0:* | \[::\]:* | :::*) where=" (published on all interfaces)" ;; esac
url="http://127.0.0.1:${published##*:}"

deadline=$((SECONDS + timeout))
until body="$(curl -fsS --max-time 3 "${url}/health" 2>/dev/null)"; do
  if [ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" != true ] || [ "$SECONDS" -ge "$deadline" ]; then
    echo "dev-run: metald did not answer ${url}/health within ${timeout}s; what systemd says:" >&2
    docker exec "$name" systemctl --no-pager --failed >&2 || docker logs --tail 50 "$name" >&2 || true
    docker exec "$name" journalctl --no-pager -u metald -n 30 >&2 || true
    exit 1
  fi
  sleep 1
done
summary="${body:0:160}"
if command -v jq >/dev/null; then
  summary="$(jq -r '"status \(.status), metald \(.version // "?"), docker engine \(.checks.docker.version // "?")"' <<<"$body" 2>/dev/null || echo "$summary")"
fi
say "metald is healthy after ${SECONDS}s (${summary})"
say "metald listens on ${url}${where} (container ${name}; VMs are sibling containers on this engine)"
