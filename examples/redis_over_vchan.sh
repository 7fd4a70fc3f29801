#!/usr/bin/env bash
# Debian's unmodified redis-server and redis-benchmark talking over vchan.
#
#   domain 1: redis-server on 127.0.0.1:$REDIS_PORT, reachable from other
#             domains only through
#             vchan proxy --listen-vchan PORT --peers 2 --to tcp:127.0.0.1:$REDIS_PORT
#   domain 2: vchan proxy --listen tcp:127.0.0.1:0 --to-vchan 1 PORT, and
#             redis-benchmark pointed at that local TCP port.
#
#   examples/redis_over_vchan.sh [redis-benchmark arguments]
#       (default: -n 2000 -c 10 -t set,get,incr -q)
#
# Domains are emulated (VCHAN_DOMID per process; VCHAN_SIM_DIR, if set, names
# the emulator's state directory).  PYTHON (default python3) must be able to
# import vchan.  Exits 0 when the benchmark completes without errors; every
# process started here is stopped on exit.
set -euo pipefail

python=${PYTHON:-python3}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
[ $# -gt 0 ] || set -- -n 2000 -c 10 -t set,get,incr -q

for tool in redis-server redis-benchmark redis-cli; do
    command -v "$tool" >/dev/null || { echo "redis_over_vchan: $tool not found" >&2; exit 2; }
done

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for FILE REGEX PID: until FILE matches REGEX (20 s); fails if PID exits.
wait_for() {
    local i
    for i in $(seq 200); do
        grep -Eq "$2" "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || { echo "redis_over_vchan: exited early:" >&2; cat "$1" >&2; return 1; }
        sleep 0.1
    done
    echo "redis_over_vchan: no /$2/ in $1 within 20 s:" >&2; cat "$1" >&2; return 1
}

redis_port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
vport="redis$$"

# Domain 1: redis, and the proxy that is its only way in from other domains.
redis-server --save '' --appendonly no --port "$redis_port" --bind 127.0.0.1 \
    --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)
wait_for "$work/redis.log" "Ready to accept connections" "${pids[-1]}"

VCHAN_DOMID=1 "$python" -m vchan proxy --listen-vchan "$vport" --peers 2 \
    --to "tcp:127.0.0.1:$redis_port" -v 2>"$work/proxy1.log" &
pids+=($!)
wait_for "$work/proxy1.log" "listening on vchan port" "${pids[-1]}"

# Domain 2: a local TCP port that leads to domain 1's vchan port.
VCHAN_DOMID=2 "$python" -m vchan proxy --listen tcp:127.0.0.1:0 --to-vchan 1 "$vport" \
    -v 2>"$work/proxy2.log" &
pids+=($!)
wait_for "$work/proxy2.log" "listening on tcp:127\.0\.0\.1:[0-9]+" "${pids[-1]}"
front=$(grep -Eo "listening on tcp:127\.0\.0\.1:[0-9]+" "$work/proxy2.log" | head -1 | sed 's/.*://')

echo "redis-server on 127.0.0.1:$redis_port in domain 1, vchan port $vport;" \
     "redis-benchmark in domain 2 via 127.0.0.1:$front"
redis-cli -p "$front" ping
if ! redis-benchmark -h 127.0.0.1 -p "$front" "$@" >"$work/bench.raw" 2>&1; then
    echo "redis_over_vchan: redis-benchmark failed:" >&2; cat "$work/bench.raw" >&2; exit 1
fi
# -q prints progress ("rps=") lines ended by carriage returns: keep the results.
tr '\r' '\n' <"$work/bench.raw" | grep -v -e '^\s*$' -e 'rps=' | tee "$work/bench.out"
echo "keys in redis (asked over vchan): $(redis-cli -p "$front" dbsize)"
if grep -qi "error" "$work/bench.out"; then
    echo "redis_over_vchan: the benchmark reported errors" >&2
    exit 1
fi
grep -q "requests per second" "$work/bench.out" || { echo "redis_over_vchan: no results" >&2; exit 1; }
echo "benchmark over vchan completed without errors"
