#!/usr/bin/env bash
# Stops the head that start_head.sh started: only the processes under its temp dir and their
# children, so other Ray instances here (a test session's, another user's) go on; `ray stop` would
# stop them all. Same settings as start_head.sh: RAY_PORT, RAY_TEMP_DIR (a joined node: its own
# --temp-dir).
set -euo pipefail

port=${RAY_PORT:-6379}
temp_dir=${RAY_TEMP_DIR:-/tmp/ray-local-$port}
# The head's daemons name its session folder on their command line (logs, sockets); its agents and
# workers rename themselves (ray::IDLE, ray::DashboardAgent), so they are found as their children.
pattern="$temp_dir/session_"

with_children() {
    local pid
    for pid in "$@"; do
        echo "$pid"
        # shellcheck disable=SC2046  # one pid per word
        with_children $(pgrep -P "$pid" || true)
    done
}

alive() {
    local pid
    for pid in "$@"; do
        if kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" | cut -c1)" != Z ]; then echo "$pid"; fi
    done
}

# shellcheck disable=SC2046
pids=$(with_children $(pgrep -f -- "$pattern" || true) | sort -un)
if [ -z "$pids" ]; then
    echo "no Ray head of $temp_dir is running"
    exit 0
fi
# shellcheck disable=SC2086
kill -TERM $pids 2>/dev/null || true
for _ in $(seq 1 30); do
    # shellcheck disable=SC2086
    left=$(alive $pids)
    [ -z "$left" ] && break
    sleep 0.5
done
if [ -n "$left" ]; then
    # shellcheck disable=SC2086
    kill -KILL $left 2>/dev/null || true
fi
echo "stopped the Ray head of $temp_dir ($(echo $pids | wc -w) processes)"
