#!/usr/bin/env bash
# Builds the local test image (no registry on test machines, spec §14): a root holding a static
# busybox and its applet links, imported with `docker import`. Idempotent: does nothing when the
# image already exists.
#
#   scripts/build-test-image.sh [IMAGE]      default IMAGE: metald-test-busybox:latest
set -euo pipefail

image="${1:-metald-test-busybox:latest}"
if docker image inspect "$image" >/dev/null 2>&1; then
  exit 0
fi

busybox=""
for candidate in /bin/busybox /usr/bin/busybox; do
  # ldd fails on a static binary: that is the one we want (it runs in an empty root).
  if [ -x "$candidate" ] && ! ldd "$candidate" >/dev/null 2>&1; then
    busybox="$candidate"
    break
  fi
done
if [ -z "$busybox" ]; then
  echo "build-test-image: a static busybox is needed: apt-get install busybox-static" >&2
  exit 1
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/tmp" "$root/www" "$root/etc" "$root/proc" "$root/sys" "$root/dev"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
chmod 1777 "$root/tmp"
echo "metald test vm" > "$root/www/index.html"
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"

# Default command: an HTTP server on $PORT (default 8080) serving /www; `exec` keeps httpd PID 1.
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/bin' \
  --change 'WORKDIR /' \
  --change 'CMD ["/bin/sh", "-c", "exec httpd -f -p ${PORT:-8080} -h /www"]' \
  - "$image" >/dev/null
echo "built $image"
