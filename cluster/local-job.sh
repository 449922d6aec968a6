#!/usr/bin/env bash
# Start a Ray head on 127.0.0.1, submit a merge to it with `ray job submit`, wait for it, report
# the job's status, and stop exactly the processes this script started. CI and the tests use it;
# it is also the shortest way to try the job path on a laptop.
#
#   cluster/local-job.sh [--address http://HOST:8265] PARENT_A PARENT_B OUT [raymerge merge options...]
#
# --address: submit to the job API of a head that runs already (started by `ray start --head`)
# instead of starting one; nothing is stopped at the end.
# Exits with the job's outcome: 0 when the job SUCCEEDED, non-zero for any other end (FAILED,
# STOPPED, never accepted).
set -uo pipefail

ADDRESS=
if [ "${1:-}" = --address ]; then
  ADDRESS=${2:-}
  shift 2 || true
fi
if [ $# -lt 3 ]; then
  echo "usage: $0 [--address http://HOST:8265] PARENT_A PARENT_B OUT [raymerge merge options...]" >&2
  exit 2
fi
A=$1 B=$2 OUT=$3
shift 3

RAY=${RAY:-$(command -v ray)}
PY=${PYTHON:-$(dirname "$RAY")/python}
WORK=$(mktemp -d -t raymerge-local-job.XXXXXX)

start_head() {
  # Ray's token authentication, with a throw-away token, unless the caller brings its own.
  if [ -z "${RAY_AUTH_MODE:-}" ]; then
    "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/token"
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$WORK/token"
  fi

  # Four free ports, none of Ray's worker ports (10002-19999) and none in the kernel's ephemeral
  # range: a port of that range, free when chosen, may be an outgoing connection's source port by
  # the time Ray binds it (a head whose client server cannot bind its port stops as a whole).
  read -r GCS_PORT DASH_PORT CLIENT_PORT AGENT_PORT < <("$PY" - <<'PORTS'
import random, socket
low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
first, last = (20000, low - 1) if low - 20000 >= 1000 else (high + 1, 65535)
ports = []
for port in random.sample(range(first, last + 1), last - first + 1):
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
    ports.append(port)
    if len(ports) == 4:
        break
print(*ports)
PORTS
)

  # Every port chosen free: the dashboard agent's default (52365) is taken by any other Ray node on
  # this machine, and a head without its agent cannot accept `ray job submit`.
  # A temporary directory of its own: the job's driver finds its head through the head's temporary
  # directory (RAY_ADDRESS=auto), and in the shared /tmp/ray that is the head started last on this
  # machine, which need not be this one.
  # In this script's process group: whoever stops the script's group stops the head with it.
  : > "$WORK/head.log"
  "$RAY" start --head --block --node-ip-address=127.0.0.1 --port="$GCS_PORT" --temp-dir="$WORK/ray" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --ray-client-server-port="$CLIENT_PORT" \
    --dashboard-agent-listen-port="$AGENT_PORT" \
    --disable-usage-stats > "$WORK/head.log" 2>&1 &
  HEAD_PID=$!

  descendants() {
    local child
    for child in $(pgrep -P "$1"); do
      echo "$child"
      descendants "$child"
    done
  }
  stop_head() {
    local pids
    pids="$HEAD_PID $(descendants "$HEAD_PID")"
    kill -9 $pids 2>/dev/null
    wait "$HEAD_PID" 2>/dev/null
    rm -rf "$WORK"
  }
  trap stop_head EXIT
  trap 'exit 130' INT TERM

  for _ in $(seq 120); do
    grep -q "Ray runtime started" "$WORK/head.log" && break
    if ! kill -0 "$HEAD_PID" 2>/dev/null; then
      echo "local-job: the Ray head did not start:" >&2
      tail -20 "$WORK/head.log" >&2
      exit 1
    fi
    sleep 0.5
  done
  ADDRESS="http://127.0.0.1:$DASH_PORT"
}
JOB_ID="raymerge-$(date +%s)-$$"
if [ -z "$ADDRESS" ]; then
  start_head
  echo "local-job: Ray head on 127.0.0.1:$GCS_PORT, job API at $ADDRESS, job $JOB_ID"
else
  trap 'rm -rf "$WORK"' EXIT
  trap 'exit 130' INT TERM
  echo "local-job: job API at $ADDRESS, job $JOB_ID"
fi
# Right after start-up the head may not have a job agent yet ("No available agent"): retry.
# `ray job submit` waits for the job, streams its log and exits non-zero when the job fails.
RC=1
for _ in $(seq 60); do
  "$RAY" job submit --address "$ADDRESS" --submission-id "$JOB_ID" -- \
    "$PY" -m raymerge.cli merge "$A" "$B" -o "$OUT" "$@" 2>&1 | tee "$WORK/submit.log"
  RC=${PIPESTATUS[0]}
  grep -q "No available agent" "$WORK/submit.log" || break
  sleep 1
done
# `ray job submit` exits 0 for a job that was stopped (`ray job stop`, the dashboard): ask the job.
STATUS=$("$PY" -c 'import sys; from ray.job_submission import JobSubmissionClient as C
print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)' "$ADDRESS" "$JOB_ID" 2>/dev/null)
echo "local-job: job $JOB_ID ${STATUS:-was not accepted} (ray job submit exited $RC)"
[ "$STATUS" = SUCCEEDED ] && exit 0
[ "$RC" -ne 0 ] && exit "$RC"
exit 1
