#!/bin/bash
# Build the guest: a kernel QEMU boots through its PVH entry and an initrd with the agent.
#
#   ./rootfs-build.sh [OUT_DIR]        (default out/guest)
#
# From Debian packages only (apt-get download + dpkg -x: nothing is installed on the host):
#   OUT_DIR/vmlinux       the ELF kernel extracted from linux-image-6.1.0-*-amd64's bzImage
#   OUT_DIR/initrd.img    zstd-compressed cpio (newc): python3.11, the stdlib modules the agent
#                         imports, agent/ + puller/ + their dependencies from the venv, busybox,
#                         the kernel modules of guest-image/modules.txt; /init runs agent.init
#   OUT_DIR/cmdline       the default kernel command line (guest-image/cmdline.txt +
#                         agent.modules=...), what `agentctl vm up` passes
#   OUT_DIR/build-info    versions and sizes
# Cached under OUT_DIR/cache: the kernel is extracted again only for a new package, the tree
# staged again only when an input changed (file lists, sources, venv, interpreter). The
# archive is reproducible: sorted entries, fixed mtimes (SOURCE_DATE_EPOCH, default 0), uid 0.
#
# Environment: KERNEL_PKG (default: the newest linux-image-6.1.0-N-amd64), ZSTD_LEVEL (19),
# SOURCE_DATE_EPOCH (0), VENV_SITE, PYTHON.
# Needs: python3.11 (Debian's; the venv at .venv, or VENV_SITE=...), busybox-static, zstd,
# binutils (strip), and apt access to Debian's mirror for the kernel package.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=$(realpath -m "${1:-$REPO/out/guest}")
CACHE=$OUT/cache
GI=$REPO/guest-image
PY=${PYTHON:-/usr/bin/python3.11}
SITE=${VENV_SITE:-$REPO/.venv/lib/python3.11/site-packages}
EPOCH=${SOURCE_DATE_EPOCH:-0}
KERNEL_PKG=${KERNEL_PKG:-}
# 19 is the smallest that still decompresses fast; 9 builds 30 s sooner for 13% more bytes.
ZSTD_LEVEL=${ZSTD_LEVEL:-19}

die() { echo "rootfs-build: $*" >&2; exit 1; }
for tool in "$PY" busybox zstd strip ldd chroot apt-get dpkg flock; do
  command -v "$tool" >/dev/null || [ -x "$tool" ] || die "missing $tool"
done
[ -d "$SITE" ] || die "no site-packages at $SITE (make the venv first, or set VENV_SITE)"
[ "$(id -u)" = 0 ] || die "run as root (the staged tree is compiled and checked in a chroot)"
mkdir -p "$CACHE"
# One build at a time per output dir (two test sessions may ask at once).
exec 9>"$CACHE/lock"
flock 9

# ---- kernel -------------------------------------------------------------------------------
if [ -z "$KERNEL_PKG" ]; then
  KERNEL_PKG=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' \
               | awk '{print $1}' | sort -V | tail -1)
  [ -n "$KERNEL_PKG" ] || die "no linux-image-6.1.0-*-amd64 package known to apt (apt-get update?)"
fi
KDIR=$CACHE/$KERNEL_PKG
if [ ! -f "$KDIR/.done" ]; then
  echo "rootfs-build: fetching $KERNEL_PKG" >&2
  rm -rf "$KDIR"; mkdir -p "$KDIR/deb"
  (cd "$KDIR/deb" && apt-get download "$KERNEL_PKG" >/dev/null 2>"$KDIR/apt.log") \
    || { cat "$KDIR/apt.log" >&2; die "apt-get download $KERNEL_PKG failed"; }
  dpkg -x "$KDIR"/deb/*.deb "$KDIR/root"
  rm -rf "$KDIR/deb"
  "$PY" "$GI/kernel.py" vmlinux "$KDIR"/root/boot/vmlinuz-* "$KDIR/vmlinux"
  touch "$KDIR/.done"
fi
KVER=$(basename "$KDIR"/root/lib/modules/*)
"$PY" "$GI/kernel.py" modules "$KDIR/root/lib/modules/$KVER" "$GI/modules.txt" > "$CACHE/modules.order"

# ---- staged tree ----------------------------------------------------------------------------
# The stamp covers every input's path, size and mtime (and the kernel package): cheap, and a
# changed file anywhere restages everything.
stamp() {
  {
    echo "$KERNEL_PKG"; cat "$CACHE/modules.order"
    find "$GI" "$REPO/agent" "$REPO/puller" "$SITE" "$PY" "$(readlink -f "$PY")" \
         /usr/lib/python3.11 "$(readlink -f "$(command -v busybox)")" \
         -name __pycache__ -prune -o -printf '%p %s %T@\n' 2>/dev/null | LC_ALL=C sort
  } | sha256sum | cut -d' ' -f1
}
STAMP=$(stamp)
STAGE=$CACHE/stage
if [ "$(cat "$CACHE/stage.stamp" 2>/dev/null)" != "$STAMP" ]; then
  echo "rootfs-build: staging the guest tree" >&2
  rm -f "$CACHE/stage.stamp"
  "$PY" "$GI/stage.py" --repo "$REPO" --site "$SITE" --modules-order "$CACHE/modules.order" \
        --out "$STAGE"
  echo "$STAMP" > "$CACHE/stage.stamp"
fi

# ---- outputs --------------------------------------------------------------------------------
cp "$KDIR/vmlinux" "$OUT/vmlinux.tmp" && mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
ISTAMP="$STAMP $EPOCH $ZSTD_LEVEL"
if [ ! -f "$OUT/initrd.img" ] || [ "$(cat "$CACHE/initrd.stamp" 2>/dev/null)" != "$ISTAMP" ]; then
  echo "rootfs-build: archiving (zstd -$ZSTD_LEVEL)" >&2
  # One thread: multi-threaded zstd output depends on the thread count.
  "$PY" "$GI/cpio.py" "$STAGE" "$EPOCH" | zstd -q "-$ZSTD_LEVEL" -T1 -c > "$OUT/initrd.img.tmp"
  mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
  echo "$ISTAMP" > "$CACHE/initrd.stamp"
fi
{
  grep -v '^[[:space:]]*#' "$GI/cmdline.txt" | tr -s '[:space:]' ' '
  echo "agent.modules=$(cat "$STAGE/etc/agent-modules")"
} | sed 's/^ *//' > "$OUT/cmdline"
SIZE=$(stat -c %s "$OUT/initrd.img")
{
  echo "kernel_package $KERNEL_PKG"
  echo "kernel_release $KVER"
  echo "python $("$PY" -c 'import platform; print(platform.python_version())')"
  echo "initrd_bytes $SIZE"
  echo "initrd_sha256 $(sha256sum "$OUT/initrd.img" | cut -d' ' -f1)"
  echo "staged_bytes $(du -sb "$STAGE" | cut -f1)"
  echo "vmlinux_bytes $(stat -c %s "$OUT/vmlinux")"
} > "$OUT/build-info"
echo "rootfs-build: kernel $OUT/vmlinux ($KVER), initrd $OUT/initrd.img: $SIZE bytes ($(( (SIZE + 524288) / 1048576 )) MiB)"
