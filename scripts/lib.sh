# Shared set-up for the README's commands (sourced, not run).

# Install Debian packages that are missing, as root or through sudo.
ensure_debian_packages() {
    local missing=()
    for package in "$@"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing Debian packages: ${missing[*]}" >&2
    local as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
}

# A TCP port nothing listens on, on loopback.
free_port() {
    local port
    for _ in $(seq 1 50); do
        port=$((20000 + RANDOM % 20000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    echo "no free loopback port found" >&2
    return 1
}

# The EXIT trap of start_test_etcd. etcd re-raises SIGTERM after its clean-up,
# so `wait` reports 143; that must not become the script's exit status (under
# `set -e` it would), so the status the script was exiting with is kept.
stop_test_etcd() {
    local status=$?
    kill "$ETCD_PID" 2>/dev/null || true
    wait "$ETCD_PID" 2>/dev/null || true
    rm -rf "$ETCD_DIR"
    exit "$status"
}

# Start etcd on free loopback ports in a temporary directory; export its URL
# as ERETES_TEST_ETCD; stop it and remove the directory on exit.
start_test_etcd() {
    ETCD_DIR=$(mktemp -d -t eretes-etcd.XXXXXX)
    local client peer
    client=$(free_port)
    peer=$(free_port)
    etcd --name eretes-test --data-dir "$ETCD_DIR/data" \
        --listen-client-urls "http://127.0.0.1:$client" \
        --advertise-client-urls "http://127.0.0.1:$client" \
        --listen-peer-urls "http://127.0.0.1:$peer" \
        --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "eretes-test=http://127.0.0.1:$peer" \
        --log-level warn >"$ETCD_DIR/etcd.log" 2>&1 &
    ETCD_PID=$!
    trap stop_test_etcd EXIT
    export ERETES_TEST_ETCD="http://127.0.0.1:$client"
    for _ in $(seq 1 100); do
        if ETCDCTL_API=3 etcdctl --endpoints "$ERETES_TEST_ETCD" endpoint health >/dev/null 2>&1; then
            echo "etcd $(etcd --version | head -1 | awk '{print $3}') is up at $ERETES_TEST_ETCD" >&2
            return 0
        fi
        sleep 0.1
    done
    echo "etcd did not start; its log:" >&2
    cat "$ETCD_DIR/etcd.log" >&2
    return 1
}
