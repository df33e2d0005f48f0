#!/usr/bin/env bash
# Runs one load-test scenario end to end on this machine: a Redis server, NODES pushnode
# nodes, GENERATORS load-generator processes (each over its own loopback source addresses),
# then collects the JSON reports and the nodes' RSS into loadtest/results/<time>-<scenario>/.
#
#   loadtest/run.sh SCENARIO CONNECTIONS [generator options...]
#   NODES=3 GENERATORS=3 loadtest/run.sh idle 50000 --duration 10m
#   loadtest/run.sh unicast 19000 --rate 50000 --duration 20s
#   loadtest/run.sh unicast 19000 --rate 5000 --publish-via api   # through POST /api/publish
#   loadtest/run.sh unicast 19000 --rate 20000 --format pusher     # Pusher sessions (signed in)
#   loadtest/run.sh floor
#   loadtest/run.sh floor --rate 20000 --connections 9000   # paced, to sleeping readers
#   loadtest/run.sh soak 30000 --rate 500 --connect-concurrency 1000   # 30 min, 3 nodes, faults
#
# Scenarios: idle unicast broadcast storm churn slow resubscribe soak (see pushnode-loadtest
# --help). NO_BUILD=1 skips the release build (when target/release is known to be current).
# NODE_BIN=path runs that pushnode binary as the nodes instead (before/after comparisons).
#
# soak: NODES=3 GENERATORS=2 by default, JSON sessions, SOAK_SECONDS long (1800). In the middle
# it kills every subscriber connection three times (at 40, 45 and 50 % of the run) and stops a
# node with SIGTERM at 55 %, starting it again 15 s after it exited. Every 10 s it records each
# node's RSS, open descriptors and sessions (nodes.csv) beside the generators' timelines; at the
# end it checks descriptors and Redis subscriptions are back to their idle values and renders
# soak.png (RSS and p99 over time) with loadtest/plot_soak.py.
# Everything listens and connects on 127.0.0.0/8 only, and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

scenario=${1:?scenario}
shift
connections=1000
# floor takes no connection count (its options follow the scenario directly).
if [[ $scenario != floor && $# -ge 1 ]]; then connections=$1; shift; fi
soak_seconds=${SOAK_SECONDS:-1800}
if [[ $scenario == soak ]]; then
  nodes=${NODES:-3}
  generators=${GENERATORS:-2}
  set -- "$@" --format json --duration "${soak_seconds}s"
else
  nodes=${NODES:-1}
  generators=${GENERATORS:-1}
fi
secret=${SECRET:-loadtest-secret-loadtest-secret-0123}
api_key=loadtest-api-key-0123456789

# PROFILE=debug uses (and builds) the debug binaries: CI's one-minute soak, not figures.
profile=${PROFILE:-release}
profile_flag=(--release); [[ $profile == release ]] || profile_flag=()
[[ -n ${NO_BUILD:-} ]] || cargo build "${profile_flag[@]}" --quiet -p pushnode -p pushnode-loadtest
bin=target/$profile
out="loadtest/results/$(date +%Y%m%dT%H%M%S)-$scenario"
mkdir -p "$out"

ulimit -n "$(ulimit -Hn)"
if [[ $scenario == floor ]]; then
  "$bin/pushnode-loadtest" floor --json "$out/floor.json" "$@" | tee "$out/summary.txt"
  exit 0
fi

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # A node the soak restarted is a child of its fault schedule: found by its pid file.
  for f in "$out"/node*.pid; do [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --maxclients 1000 --client-output-buffer-limit "pubsub 64mb 16mb 60" >"$out/redis.log" 2>&1 &
pids+=($!)
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.05; done

# --format pusher: the nodes get a Pusher app (the generator's defaults) with its API on the
# internal listener too; other runs leave the Pusher front end off.
pusher_env=()
if [[ " $* " == *" pusher "* ]]; then
  pusher_env=(PUSHNODE__PUSHER__APPS__0__ID=1 PUSHNODE__PUSHER__APPS__0__KEY=loadtest-key
    PUSHNODE__PUSHER__APPS__0__SECRET=loadtest-pusher-secret PUSHNODE__PUSHER__API_LISTENER=both)
fi

urls=()
node_pids=()
internals=()
publics=()
# Starts node $1 on its ports (publics/internals), records its pid, waits until ready.
start_node() {
  local i=$1 public=${publics[$1]} internal=${internals[$1]}
  env "${pusher_env[@]}" \
  PUSHNODE__SERVER__PUBLIC_ADDR=127.0.0.1:$public \
  PUSHNODE__SERVER__INTERNAL_ADDR=127.0.0.1:$internal \
  PUSHNODE__SERVER__NODE_ID=node$i \
  PUSHNODE__AUTH__JWT_SECRET=$secret \
  PUSHNODE__AUTH__API_KEYS=$api_key \
  PUSHNODE__DEMO__ENABLED=false \
  PUSHNODE__BROKER__KIND=redis \
  PUSHNODE__BROKER__REDIS_URL=redis://127.0.0.1:$redis_port \
  PUSHNODE__LIMITS__MAX_CONNECTIONS=60000 \
  PUSHNODE__LOG__FILTER=warn \
  TOKIO_WORKER_THREADS=${NODE_WORKERS:-2} \
    "${NODE_BIN:-$bin/pushnode}" serve >>"$out/node$i.log" 2>&1 &
  pids+=($!); node_pids[$i]=$!
  echo $! >"$out/node$i.pid"
  until curl -sf "http://127.0.0.1:$internal/readyz" >/dev/null; do sleep 0.05; done
}
for ((i = 0; i < nodes; i++)); do
  publics[$i]=$(free_port); internals[$i]=$(free_port)
  start_node "$i"
  urls+=(--url "ws://127.0.0.1:${publics[$i]}/ws" --api-url "http://127.0.0.1:${internals[$i]}")
done
node_pid_args=(); for p in "${node_pids[@]}"; do node_pid_args+=(--node-pid "$p"); done
rss() { local t=0; for p in "${node_pids[@]}"; do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0))); done; echo "$t"; }
rss_before=$(rss)
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
idle_fds=(); for ((i = 0; i < nodes; i++)); do idle_fds[$i]=$(fds "${node_pids[$i]}"); done

# The nodes' combined RSS every 30 s while the scenario runs (is it flat?).
( while sleep 30; do echo "$(date +%T) $(rss) KiB"; done ) >"$out/rss.log" 2>/dev/null &
pids+=($!)

# Redis's own cost of the scenario: command counts and server time per call, and its CPU.
redis-cli -p "$redis_port" CONFIG RESETSTAT >/dev/null
redis_cpu() { redis-cli -p "$redis_port" INFO cpu | awk -F: '/^used_cpu_(user|sys):/ {t += $2} END {printf "%.3f", t}'; }
redis_cpu_before=$(redis_cpu)

per=$(( connections / generators ))
run_octet=$(( RANDOM % 250 + 1 ))
gen_pids=()
for ((g = 0; g < generators; g++)); do
  # Four source addresses per generator, 127.<run>.<g>.2-5, with <run> new for every run: the
  # previous run's ~19,000 client sockets sit in TIME_WAIT for 60 s on its addresses, and
  # reusing them made back-to-back connects take 15-25 s instead of 2-3 s.
  sources=$(for ((s = 0; s < 4; s++)); do printf '127.%d.%d.%d,' "$run_octet" "$g" $((2 + s)); done); sources=${sources%,}
  timeline=(); [[ $scenario != soak ]] || timeline=(--timeline "$out/timeline$g.csv")
  "$bin/pushnode-loadtest" run --scenario "$scenario" "${urls[@]}" --connections "$per" "${timeline[@]}" \
    --user-offset $((g * per)) --sources "$sources" --jwt-secret "$secret" --api-key "$api_key" \
    --redis-url "redis://127.0.0.1:$redis_port" "${node_pid_args[@]}" --total-connections "$connections" \
    --json "$out/generator$g.json" "$@" >"$out/generator$g.txt" 2>&1 &
  gen_pids+=($!)
done
if [[ $scenario == soak ]]; then
  # Each node's RSS, descriptors, sessions and live heap (jemalloc's allocated bytes, in KiB)
  # every 10 s (epoch seconds, as the timelines).
  (
    echo "time,node,pid,rss_kib,fds,sessions,allocated_kib" >"$out/nodes.csv"
    while sleep 10; do
      for ((i = 0; i < nodes; i++)); do
        p=$(cat "$out/node$i.pid")
        r=$(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
        [[ -n $r ]] || continue
        m=$(curl -sf --max-time 2 "http://127.0.0.1:${internals[$i]}/metrics" |
          awk '$1 == "pushnode_connections" {s = $2} $1 == "pushnode_allocator_allocated_bytes" {a = int($2 / 1024)} END {print s "," a}')
        echo "$(date +%s),$i,$p,$r,$(fds "$p"),${m:-,}" >>"$out/nodes.csv"
      done
    done
  ) &
  pids+=($!)
  # The fault schedule, from the moment the generators start connecting.
  (
    at() { sleep "$(awk "BEGIN {print $soak_seconds * $1}")"; }
    echo "time,event" >"$out/faults.csv"
    at 0.40; redis-cli -p "$redis_port" CLIENT KILL TYPE pubsub >/dev/null; echo "$(date +%s),subscribers killed" >>"$out/faults.csv"
    at 0.05; redis-cli -p "$redis_port" CLIENT KILL TYPE pubsub >/dev/null; echo "$(date +%s),subscribers killed" >>"$out/faults.csv"
    at 0.05; redis-cli -p "$redis_port" CLIENT KILL TYPE pubsub >/dev/null; echo "$(date +%s),subscribers killed" >>"$out/faults.csv"
    at 0.05
    victim=$(( nodes > 1 ? 1 : 0 )); p=$(cat "$out/node$victim.pid")
    echo "$(date +%s),node$victim SIGTERM" >>"$out/faults.csv"
    kill -TERM "$p"; while kill -0 "$p" 2>/dev/null; do sleep 0.2; done
    echo "$(date +%s),node$victim exited" >>"$out/faults.csv"
    sleep 15
    start_node "$victim"
    echo "$(date +%s),node$victim ready again" >>"$out/faults.csv"
    echo "$victim $(fds "$(cat "$out/node$victim.pid")")" >"$out/restarted-idle-fds"
  ) &
  faults_pid=$!
  pids+=($faults_pid)
fi

status=0
for p in "${gen_pids[@]}"; do wait "$p" || status=1; done
rss_after=$(rss)
redis_cpu_after=$(redis_cpu)
redis-cli -p "$redis_port" INFO commandstats >"$out/redis-commandstats.txt"
# What the nodes refused or dropped on the way (connections evicted or timed out before their
# upgrade, failed accepts, rejected upgrades): a run that shows any deserves a look.
for ((i = 0; i < nodes; i++)); do
  curl -sf "http://127.0.0.1:${internals[$i]}/metrics" >"$out/node$i.metrics" || true
done
{
  for ((g = 0; g < generators; g++)); do echo "--- generator $g"; cat "$out/generator$g.txt"; done
  echo "--- nodes: $nodes, RSS $rss_before KiB before, $rss_after KiB at the end"
  echo "--- nodes' RSS every 30 s:"; cat "$out/rss.log"
  echo "--- Redis: $(awk "BEGIN {printf \"%.3f\", $redis_cpu_after - $redis_cpu_before}") CPU seconds;" \
    "calls and server time per call:"
  awk -F'[:=,]' '/^cmdstat_/ {sub("cmdstat_", "", $1); printf "  %-14s %10d calls %8.2f us/call\n", $1, $3, $7}' \
    "$out/redis-commandstats.txt"
  echo "--- nodes' refusals (non-zero counters):"
  cat "$out"/node*.metrics 2>/dev/null |
    grep -E '^pushnode_(http_connections_dropped|accept_errors|connections_rejected)_total' | grep -v ' 0$' || echo "none"
} | tee "$out/summary.txt"

if [[ $scenario == soak ]]; then
  # The generators closed every socket: after the nodes' unsubscribe delay (2 s), descriptors
  # and Redis subscriptions must be back to their idle values (each node's own probes only).
  sleep 6
  node_pids=(); for ((i = 0; i < nodes; i++)); do node_pids[$i]=$(cat "$out/node$i.pid"); done
  if [[ -f $out/restarted-idle-fds ]]; then read -r victim v_fds <"$out/restarted-idle-fds"; idle_fds[$victim]=$v_fds; fi
  {
    echo "--- soak, after every client left:"
    for ((i = 0; i < nodes; i++)); do
      now=$(fds "${node_pids[$i]}")
      verdict=PASS; (( now <= idle_fds[i] + 2 )) || { verdict=FAIL; status=1; }
      echo "node$i: $now descriptors open, ${idle_fds[$i]} when idle: $verdict"
    done
    subs=$(redis-cli -p "$redis_port" CLIENT LIST TYPE pubsub | grep -o 'sub=[0-9]*' | awk -F= '{t += $2} END {print t + 0}')
    conns=$(redis-cli -p "$redis_port" CLIENT LIST TYPE pubsub | grep -c . || true)
    users=$(redis-cli -p "$redis_port" PUBSUB CHANNELS 'pushnode:user:*' | grep -c . || true)
    verdict=PASS; (( users == 0 && subs == conns )) || { verdict=FAIL; status=1; }
    echo "redis: $conns subscriber connections holding $subs channels (one probe each), $users user channels: $verdict"
  } | tee -a "$out/summary.txt"
  python=python3
  if ! python3 -c 'import matplotlib' 2>/dev/null; then
    [[ -x loadtest/.venv/bin/python ]] || python3 -m venv loadtest/.venv
    loadtest/.venv/bin/pip install --quiet --disable-pip-version-check -r loadtest/requirements.txt
    python=loadtest/.venv/bin/python
  fi
  "$python" loadtest/plot_soak.py "$out" | tee -a "$out/summary.txt"
fi
exit $status
