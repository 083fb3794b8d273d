#!/usr/bin/env bash
# A Ray head on this machine only (127.0.0.1), to try the jobs the way a cluster runs them:
#
#   cluster/local/start_head.sh
#   RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265 .venv/bin/ray job submit --working-dir . -- python -m jobs.label ...
#   cluster/local/stop.sh
#
# The dashboard (job API) listens on 127.0.0.1 only. Ray advertises the machine's own address for
# --node-ip-address 127.0.0.1 and its GCS port listens on every interface; Ray's token
# authentication guards it (RAY_AUTH_MODE=token unless you set RAY_AUTH_MODE=disabled).
#
# Settings (environment): RAY_PORT (GCS, 6379), RAY_DASHBOARD_PORT (8265; `ray job submit` talks
# to it), RAY_NUM_CPUS / RAY_NUM_GPUS (default: detected), RAY_TEMP_DIR (default
# /tmp/ray-local-<RAY_PORT>: its own folder, which is how stop.sh finds this head's processes and
# no other Ray on the machine), VIRTUAL_ENV (the venv whose ray and python run everything; default
# the repository's .venv). Arguments are passed on to `ray start`, e.g. --resources '{"head": 1}'.
# A second node joins (add --dashboard-agent-listen-port PORT when another Ray here holds 52365),
# and later leaves, with
#   RAY_AUTH_MODE=token .venv/bin/ray start --address 127.0.0.1:6379 --node-ip-address 127.0.0.1 --temp-dir /tmp/ray-local-6379-node2
#   RAY_TEMP_DIR=/tmp/ray-local-6379-node2 cluster/local/stop.sh
# (tests/test_cluster_local.py runs both, and a job across them that loses the second node.)
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
venv_bin="${VIRTUAL_ENV:-$repo/.venv}/bin"
if [ ! -x "$venv_bin/ray" ]; then
    echo "error: $venv_bin/ray not found; run 'make install' in $repo first (or set VIRTUAL_ENV to a venv with Ray)" >&2
    exit 1
fi
# A job's entrypoint `python -m jobs.X` runs with the head's PATH: the venv's python comes first.
export PATH="$venv_bin:$PATH"

port=${RAY_PORT:-6379}
dashboard_port=${RAY_DASHBOARD_PORT:-8265}
temp_dir=${RAY_TEMP_DIR:-/tmp/ray-local-$port}
# Jobs are submitted through the dashboard agent, whose fixed default port (52365) another Ray on
# the machine may hold already; then `ray job submit` fails with "No available agent". Free ports:
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
agent_port=${RAY_DASHBOARD_AGENT_PORT:-$(free_port)}
client_port=${RAY_CLIENT_SERVER_PORT:-$(free_port)}
# Ray's token authentication: the head and `ray job submit` must agree, so it is set here (the
# token is ~/.ray/auth_token, made on first use) and the submit line below sets it too.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
# `ray start` does not make the token: on a machine that has none yet (no RAY_AUTH_TOKEN, no
# RAY_AUTH_TOKEN_PATH, no ~/.ray/auth_token), Ray's own command makes ~/.ray/auth_token.
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
        if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
            echo "error: RAY_AUTH_TOKEN_PATH is $RAY_AUTH_TOKEN_PATH, which is missing or empty: put the cluster's token there, or unset it to use ~/.ray/auth_token (made here if missing)" >&2
            exit 1
        fi
    elif [ ! -s "$HOME/.ray/auth_token" ] && ! ray get-auth-token --generate > /dev/null; then
        echo "error: no Ray auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and 'ray get-auth-token --generate' could not make one" >&2
        exit 1
    fi
fi
resources=()
if [ -n "${RAY_NUM_CPUS:-}" ]; then resources+=(--num-cpus "$RAY_NUM_CPUS"); fi
if [ -n "${RAY_NUM_GPUS:-}" ]; then resources+=(--num-gpus "$RAY_NUM_GPUS"); fi

ray start --head \
    --node-ip-address 127.0.0.1 --port "$port" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" \
    --dashboard-agent-listen-port "$agent_port" --ray-client-server-port "$client_port" \
    --temp-dir "$temp_dir" --disable-usage-stats \
    ${resources[@]+"${resources[@]}"} "$@"

# `ray job submit` needs the dashboard's job API; it comes up a little after `ray start` returns.
# Without it the head is of no use here: stop it again.
if ! python - "$dashboard_port" <<'PY'
import sys, time, urllib.error, urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}/api/jobs/"
deadline = time.monotonic() + 60
error = None
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                break
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # the job API is there and asks for Ray's auth token, as it should
            break
        error = exc
    except OSError as exc:
        error = exc
    if time.monotonic() > deadline:
        sys.exit(
            f"error: the Ray head started, but its job API at {url} did not answer within 60 s ({error}). "
            "`ray job submit` needs it: check that the port is free (RAY_DASHBOARD_PORT) and that the "
            "dashboard's packages are installed (pip install 'ray[default]' at the version of constraints.txt; "
            "without them the dashboard runs with its HTTP server disabled)"
        )
    time.sleep(1)
PY
then
    RAY_PORT=$port RAY_TEMP_DIR=$temp_dir "$repo/cluster/local/stop.sh" >&2
    exit 1
fi

echo
echo "Ray head up (GCS port $port), job API on http://127.0.0.1:$dashboard_port, processes under $temp_dir"
echo "submit: RAY_AUTH_MODE=$RAY_AUTH_MODE RAY_ADDRESS=http://127.0.0.1:$dashboard_port $venv_bin/ray job submit --working-dir . -- python -m jobs.label ..."
echo "stop:   RAY_PORT=$port $repo/cluster/local/stop.sh"
