#!/usr/bin/env bash
# Roll three grace-demo instances behind HAProxy under load, by hand (grace-demo/tests/fleet.rs
# runs the same roll in CI):
#
#   cargo build --release -p grace-demo
#   scripts/haproxy-roll.sh replace   # SIGTERM (pre-stop delay) + a fresh start, one by one
#   scripts/haproxy-roll.sh upgrade   # grace-demo ctl upgrade, one by one
#
# Prints the failed requests seen through HAProxy (the goal: none) and each instance's exit.
set -euo pipefail
mode=${1:-replace}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${GRACE_DEMO:-$root/target/release/grace-demo}
command -v haproxy >/dev/null || { echo "haproxy is not installed (apt-get install haproxy)"; exit 1; }
[ -x "$bin" ] || { echo "build it first: cargo build --release -p grace-demo"; exit 1; }

work=$(mktemp -d)
ports=(18081 18082 18083)
front=18080
pids=()
cleanup() {
  kill "${load_pid:-0}" 2>/dev/null || true
  kill "${lb_pid:-0}" 2>/dev/null || true
  for i in 0 1 2; do
    pid=$("$bin" ctl --socket "$work/$i/control.sock" --json status 2>/dev/null | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  echo "logs in $work"
}
trap cleanup EXIT

start() { # start N: instance N on its port, in its own directory
  mkdir -p "$work/$1"
  (cd "$work/$1" && exec "$bin" --listen "127.0.0.1:${ports[$1]}" --pre-stop-delay 1500ms \
     --control-socket "$work/$1/control.sock" >"$work/$1/stdout" 2>>"$work/$1/stderr.log") &
  pids[$1]=$!
  for _ in $(seq 100); do grep -q "listening on" "$work/$1/stdout" 2>/dev/null && return; sleep 0.05; done
  echo "instance $1 did not start"; exit 1
}
for i in 0 1 2; do start "$i"; done

cat >"$work/haproxy.cfg" <<EOF
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  retries 3
  option redispatch
  retry-on all-retryable-errors
  option httpchk GET /readyz
  default-server inter 200ms fall 2 rise 2
frontend fe
  bind 127.0.0.1:$front
  default_backend be
backend be
  balance roundrobin
  server s0 127.0.0.1:${ports[0]} check
  server s1 127.0.0.1:${ports[1]} check
  server s2 127.0.0.1:${ports[2]} check
EOF
haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
lb_pid=$!
sleep 1

# Steady load: keep-alive requests through HAProxy, each failure printed.
( while :; do
    curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$front/" "http://127.0.0.1:$front/" \
      | grep -v '^200$' | sed 's/^/FAILED /' || true
  done ) >"$work/failures" &
load_pid=$!
sleep 1

for i in 0 1 2; do
  if [ "$mode" = upgrade ]; then
    echo "instance $i: ctl upgrade → new pid $("$bin" ctl --socket "$work/$i/control.sock" upgrade)"
  else
    kill -TERM "${pids[$i]}"
    wait "${pids[$i]}" && echo "instance $i: exited 0 (clean)" || echo "instance $i: exited $?"
    start "$i"
  fi
  sleep 2 # HAProxy's rise: the instance is back in rotation
done
sleep 1
kill "$load_pid"; unset load_pid
echo "failed requests through HAProxy: $(grep -c FAILED "$work/failures" || true)"
