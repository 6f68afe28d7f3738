#!/usr/bin/env bash
# The one install of the Unkey deploy services under systemd (spec §12), shared by Dockerfile.dev,
# the end-to-end test (scripts/dev-e2e.sh), `make install` on a host and `make lint-dev`, so that
# they cannot drift:
#   - binaries: metald and metald-cli (required), billaged, assetmanagerd and builderd (when
#     present) from --bin-dir into /usr/local/bin; without --bin-dir they must already be there
#   - units: systemd/*.service into /etc/systemd/system
#   - env file: systemd/unkey-deploy.env as /etc/default/unkey-deploy (an existing file that
#     differs is kept, and the shipped one is written beside it as unkey-deploy.dist)
#   - users (sysusers.d) and directories (tmpfiles.d), created now and at every boot
#   - sysctl.d/60-metald.conf: the VM host-port range reserved from the kernel's ephemeral
#     ports (applied now when /proc/sys is writable, and at every boot)
#   - metald-health, the dev container's HEALTHCHECK
#   - the four units enabled (the other three run only when their binaries are present)
#
#   scripts/dev-install.sh [--root DIR] [--bin-dir DIR] [--now]
#
#   --root DIR     install into DIR instead of / (an image root, or lint-dev's scratch root)
#   --bin-dir DIR  take the binaries from DIR (e.g. target/release)
#   --now          on a host whose systemd is running: reload and (re)start metald
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
units_src="${here}/../systemd"
root=/
bin_dir=""
now=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

while [ "$#" -gt 0 ]; do
  case "$1" in
    --root) root="${2:?--root needs a directory}"; shift 2 ;;
    --bin-dir) bin_dir="${2:?--bin-dir needs a directory}"; shift 2 ;;
    --now) now=1; shift ;;
    -h | --help) usage ;;
    *) echo "dev-install: unknown argument: $1" >&2; usage ;;
  esac
done

[ -d "$root" ] || { echo "dev-install: no such root: $root" >&2; exit 1; }
[ -f "${units_src}/metald.service" ] || {
  echo "dev-install: systemd/ not found beside the script (${units_src})" >&2; exit 1; }
root="$(cd "$root" && pwd)"
prefix="${root%/}"      # "" for /, so "${prefix}/etc" is a path either way

services=(assetmanagerd billaged builderd metald)
optional_bins=(billaged assetmanagerd builderd)

say() { echo "dev-install: $*"; }

# 1. Binaries.
install -d -m 0755 "${prefix}/usr/local/bin"
if [ -n "$bin_dir" ]; then
  for bin in metald metald-cli; do
    [ -x "${bin_dir}/${bin}" ] || { echo "dev-install: ${bin_dir}/${bin} missing (make build)" >&2; exit 1; }
    install -m 0755 "${bin_dir}/${bin}" "${prefix}/usr/local/bin/${bin}"
  done
  for bin in "${optional_bins[@]}"; do
    if [ -x "${bin_dir}/${bin}" ]; then
      install -m 0755 "${bin_dir}/${bin}" "${prefix}/usr/local/bin/${bin}"
    fi
  done
fi
# The dev container's HEALTHCHECK: metald's /health on the configured address and port.
install -m 0755 "${units_src}/metald-health" "${prefix}/usr/local/bin/metald-health"
for bin in metald metald-cli; do
  [ -x "${prefix}/usr/local/bin/${bin}" ] || {
    echo "dev-install: ${prefix}/usr/local/bin/${bin} missing: pass --bin-dir" >&2; exit 1; }
done
present=()
for bin in "${optional_bins[@]}"; do
  [ -x "${prefix}/usr/local/bin/${bin}" ] && present+=("$bin")
done

# 2. Units, users, directories.
install -d -m 0755 "${prefix}/etc/systemd/system" "${prefix}/etc/sysusers.d" "${prefix}/etc/tmpfiles.d"
for svc in "${services[@]}"; do
  install -m 0644 "${units_src}/${svc}.service" "${prefix}/etc/systemd/system/${svc}.service"
done
install -m 0644 "${units_src}/sysusers-unkey-deploy.conf" "${prefix}/etc/sysusers.d/unkey-deploy.conf"
install -m 0644 "${units_src}/tmpfiles-unkey-deploy.conf" "${prefix}/etc/tmpfiles.d/unkey-deploy.conf"
# VM host ports (UNKEY_METALD_DOCKER_PORT_RANGE_*, 30000-40000) reserved from the kernel's
# ephemeral ports, which outgoing connections would otherwise take from under Docker.
install -d -m 0755 "${prefix}/etc/sysctl.d"
install -m 0644 "${units_src}/sysctl-metald.conf" "${prefix}/etc/sysctl.d/60-metald.conf"

# 3. The env file; a local edit is never overwritten.
install -d -m 0755 "${prefix}/etc/default"
env_file="${prefix}/etc/default/unkey-deploy"
if [ -e "$env_file" ] && ! cmp -s "${units_src}/unkey-deploy.env" "$env_file"; then
  install -m 0644 "${units_src}/unkey-deploy.env" "${env_file}.dist"
  say "kept the existing ${env_file}; the shipped one is ${env_file}.dist"
else
  install -m 0644 "${units_src}/unkey-deploy.env" "$env_file"
fi

if [ "$root" = / ]; then
  # The reservation now, not only at the next boot (a container's /proc/sys may be read-only).
  if [ -w /proc/sys/net/ipv4/ip_local_reserved_ports ]; then
    sysctl -q -p /etc/sysctl.d/60-metald.conf || say "could not apply /etc/sysctl.d/60-metald.conf now"
  fi
  systemd-sysusers /etc/sysusers.d/unkey-deploy.conf
  systemd-tmpfiles --create /etc/tmpfiles.d/unkey-deploy.conf
else
  # With --root, a file argument is a path on this system, not in the root.
  systemd-sysusers --root="$root" "${prefix}/etc/sysusers.d/unkey-deploy.conf"
  systemd-tmpfiles --create --root="$root" "${prefix}/etc/tmpfiles.d/unkey-deploy.conf"
fi

# 4. Enable. Without a running systemd (an image build, a scratch root) systemctl only links.
units=()
for svc in "${services[@]}"; do units+=("${svc}.service"); done
if [ "$root" = / ]; then
  systemctl enable --quiet "${units[@]}"
else
  systemctl --root="$root" enable --quiet "${units[@]}"
fi

say "installed into ${root}: metald, metald-cli; units ${units[*]} enabled"
if [ "${#present[@]}" -gt 0 ]; then
  say "optional services present (will run): ${present[*]}"
else
  say "optional services absent (their units are skipped): ${optional_bins[*]}"
fi

# 5. On a running host: pick up the new units now.
if [ "$now" = 1 ]; then
  if [ "$root" = / ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    # restart, not start: a reinstall must run the new binary. The optional ones start when present.
    systemctl restart metald.service
    if [ "${#present[@]}" -gt 0 ]; then
      for bin in "${present[@]}"; do systemctl restart "${bin}.service"; done
    fi
    say "metald is $(systemctl is-active metald.service); logs: journalctl -u metald -f"
  else
    say "--now ignored: systemd is not running in ${root}"
  fi
fi
