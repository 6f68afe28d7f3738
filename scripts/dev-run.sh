#!/usr/bin/env bash
# Starts the dev container (systemd as PID 1, the host's Docker socket mounted) and waits until
# metald answers /health; used by `make docker-dev-up` and by scripts/dev-e2e.sh.
#
#   scripts/dev-run.sh NAME IMAGE [extra `docker run` arguments...]
#
# The container shares the host's network namespace (--network host): metald then sees every
# client's real address and refuses VMs by theirs (spec §5.1), as it does when run on the host.
# Behind a published port it could not: Docker's NAT or proxy gives every client, a VM calling
# the host's address included, the same gateway address, so a port published on all interfaces
# would let every VM drive the API.
#
# What systemd needs from the engine: `--privileged` where the host allows it, otherwise the
# minimal set: --cap-add SYS_ADMIN, seccomp unconfined (AppArmor too where it is enabled), tmpfs
# on /run, /run/lock and /tmp, and the cgroup tree (read-only on cgroup v1; on cgroup v2 the
# host's cgroup namespace, writable). Environment:
#   DEV_RUN_FLAGS       replaces that choice entirely (e.g. DEV_RUN_FLAGS=--privileged)
#   DEV_PUBLISH         where metald listens, in `docker run -p` form for port 8080 (default
#                       127.0.0.1:8080:8080; 127.0.0.1::8080 picks a free port; 8080:8080 is
#                       every interface, VMs still refused)
#   DEV_ENV_FILE        overrides of /etc/default/unkey-deploy (optional); with the listen
#                       address and port it becomes the container's /etc/default/unkey-deploy.local
#   DEV_STATE_DIR       where that file is written (default .data/dev-run in the checkout)
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

# DEV_PUBLISH: [IP:][HOSTPORT:]8080, as `docker run -p` reads it.
case "$publish" in
  *:*:8080) listen_ip="${publish%%:*}"; rest="${publish#*:}"; listen_port="${rest%:8080}" ;;
  *:8080) listen_ip=0.0.0.0; listen_port="${publish%:8080}" ;;
  8080) listen_ip=0.0.0.0; listen_port="" ;;
  *) echo "dev-run: DEV_PUBLISH=${publish}: expected [IP:][HOSTPORT:]8080" >&2; exit 2 ;;
esac
listen_ip="${listen_ip#[}"; listen_ip="${listen_ip%]}"
if [ -z "$listen_port" ]; then
  # A free port: nothing accepts a connection on it (good enough for a dev environment).
  for _ in $(seq 1 50); do
    candidate=$((20000 + RANDOM % 10000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/${candidate}") 2>/dev/null; then listen_port="$candidate"; break; fi
  done
  [ -n "$listen_port" ] || { echo "dev-run: found no free port" >&2; exit 1; }
fi
case "$listen_port" in '' | *[!0-9]*) echo "dev-run: DEV_PUBLISH=${publish}: bad port" >&2; exit 2 ;; esac

if [ -n "$(docker ps -aq --filter "name=^/${name}\$")" ]; then
  say "removing the previous container $name"
  docker rm -f "$name" >/dev/null
fi

# The overrides the services read: DEV_ENV_FILE, then where metald listens (later lines win).
state_dir="${DEV_STATE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.data/dev-run}"
mkdir -p "$state_dir"
env_local="$(cd "$state_dir" && pwd)/${name}.env"
{
  if [ -n "${DEV_ENV_FILE:-}" ]; then
    [ -f "$DEV_ENV_FILE" ] || { echo "dev-run: DEV_ENV_FILE $DEV_ENV_FILE not found" >&2; exit 1; }
    cat "$DEV_ENV_FILE"
    echo
  fi
  echo "# dev-run.sh: DEV_PUBLISH=${publish}"
  echo "UNKEY_METALD_ADDRESS=${listen_ip}"
  echo "UNKEY_METALD_PORT=${listen_port}"
} >"$env_local"

common=(--detach --name "$name" --hostname "$name"
        --network host
        --volume "${sock}:/var/run/docker.sock"
        --volume "${env_local}:/etc/default/unkey-deploy.local:ro"
        --tmpfs /run --tmpfs /run/lock --tmpfs /tmp)

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

where=""
url_host="$listen_ip"
case "$listen_ip" in
  0.0.0.0 | ::) where=" (all interfaces; VMs are refused)"; url_host=127.0.0.1 ;;
  *:*) url_host="[${listen_ip}]" ;;
esac
url="http://${url_host}:${listen_port}"

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
say "metald listens on ${url}${where} (container ${name}, host network; VMs are sibling containers on this engine)"
if [ "$listen_port" != 8080 ]; then
  say "inside the container: UNKEY_METALD_SERVER_ADDRESS=${url} metald-cli ..."
fi
