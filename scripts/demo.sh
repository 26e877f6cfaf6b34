#!/usr/bin/env bash
# The main job, end to end, on a fresh Debian 12 machine (as root):
#   1. installs what it needs (apt + venv; idempotent) and builds the guest kernel + initrd
#      with the agent baked in (rootfs-build.sh; cached);
#   2. starts a local OCI registry (Debian's docker-registry) on 127.0.0.1 and pushes a small
#      image built offline (busybox, GNU tar, umoci, skopeo);
#   3. boots the guest in QEMU (KVM where it works, else TCG), agent channel over vsock or
#      virtio-serial;
#   4. inside the sandbox: pulls the image with the puller, runs a container from it and
#      streams its output here; then shuts the guest down cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
./scripts/setup.sh >/dev/null
CTL=$REPO/.venv/bin/agentctl
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

work=$(mktemp -d /tmp/sandbox-agent-demo.XXXXXX)
reg_pid=""
cleanup() {
    "$CTL" vm down --state-dir "$work/vm" >/dev/null 2>&1 || true
    [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null && wait "$reg_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

say "building the guest (kernel + initrd with the agent)"
./rootfs-build.sh out/guest | tail -n 3

say "starting a registry on 127.0.0.1 and pushing demo/hello:v1"
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry/data}}
http: {addr: 127.0.0.1:$port, secret: demo}
YML
/usr/bin/docker-registry serve "$work/registry/config.yml" >"$work/registry/log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done

img=$work/image
mkdir -p "$img/rootfs/bin" "$img/rootfs/etc" "$img/rootfs/tmp"
cp /bin/busybox "$img/rootfs/bin/busybox"
for a in sh echo cat uname hostname id ls; do ln -s busybox "$img/rootfs/bin/$a"; done
echo "root:x:0:0:root:/:/bin/sh" > "$img/rootfs/etc/passwd"
cat > "$img/rootfs/hello.sh" <<'SH'
#!/bin/sh
echo "Hello from a container whose image was pulled inside the sandbox."
echo "  kernel:   $(uname -sr)"
echo "  hostname: $(hostname)"
echo "  user:     $(id)"
SH
chmod 755 "$img/rootfs/hello.sh"
tar -C "$img/rootfs" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$img/layer.tar" .
umoci init --layout "$img/layout"
umoci new --image "$img/layout:hello"
umoci raw add-layer --image "$img/layout:hello" "$img/layer.tar"
umoci config --image "$img/layout:hello" --config.entrypoint /hello.sh --os linux --architecture amd64
skopeo copy --quiet --dest-tls-verify=false "oci:$img/layout:hello" "docker://127.0.0.1:$port/demo/hello:v1"
echo "pushed 127.0.0.1:$port/demo/hello:v1"

say "booting the guest"
"$CTL" vm up --mux --state-dir "$work/vm" | tee "$work/vm-up.txt"
addr=$(sed -n 's/^server-addr: //p' "$work/vm-up.txt")

say "agentctl check / version over the guest channel"
"$CTL" --server-addr "$addr" check
"$CTL" --server-addr "$addr" version
"$CTL" --server-addr "$addr" create-sandbox --hostname demo-sandbox

say "pull inside the sandbox, run a container, stream its output"
# the guest reaches the host's 127.0.0.1 as 10.0.2.2 (QEMU user-mode networking)
"$CTL" --server-addr "$addr" --timeout 600 run --insecure-registry "10.0.2.2:$port" "10.0.2.2:$port/demo/hello:v1"

say "shutting the guest down"
"$CTL" vm down --state-dir "$work/vm"
