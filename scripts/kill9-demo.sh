#!/usr/bin/env bash
# What `kill -9` leaves behind, next to what SIGTERM leaves behind, under the same load.
#
# For each of SIGTERM and SIGKILL this script starts grace-demo, opens 10 accounts, runs
# concurrent transfers from background curl loops, sends the signal after a few seconds,
# and then compares what the clients were told with what the stores hold:
#
#   answered 200        transfers the clients were told succeeded
#   no answer           requests whose connection died without a response (outcome unknown
#                       to the client: it will retry, and may pay twice)
#   in database         transfer rows committed
#   in audit file       lines in the audit file (written through a 64 KiB buffer that the
#                       graceful shutdown flushes and fsyncs; kill -9 loses the buffer)
#   committed, never answered / answered, missing from audit: the inconsistencies
#   sum of balances     must stay 10 x 100000 either way (the database transaction is atomic)
#
# With SQLite it also shows the -wal/-shm files a killed process leaves; with MariaDB the
# growth of Aborted_clients, with PostgreSQL of sessions_abandoned (connections dropped
# without a goodbye); with Redis the events list length.
#
# Usage:
#   scripts/kill9-demo.sh                                  # embedded SQLite, 3 s of load
#   scripts/kill9-demo.sh --db mysql://root@127.0.0.1:3306/test --redis redis://127.0.0.1:6379
#   scripts/kill9-demo.sh --db postgres://postgres@127.0.0.1:5432/test --seconds 5
#
# Needs curl, and sqlite3 / mysql / psql / redis-cli for the stores you use. Builds the demo
# with cargo unless GRACE_DEMO points at a binary. Tables it creates are dropped at the end.
set -euo pipefail

DB=""
REDIS=""
SECONDS_OF_LOAD=3
WORKERS=8
while [ $# -gt 0 ]; do
    case "$1" in
        --db) DB="$2"; shift 2 ;;
        --redis) REDIS="$2"; shift 2 ;;
        --seconds) SECONDS_OF_LOAD="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.."
if [ -z "${GRACE_DEMO:-}" ]; then
    cargo build -q -p grace-demo
    GRACE_DEMO="$PWD/target/debug/grace-demo"
fi
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/grace-kill9.XXXXXX")"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$SCRATCH"
}
trap cleanup EXIT

# Runs one SQL statement against the database of this run; prints rows, tab-separated.
sql() { # url statement
    local url="$1" q="$2"
    case "$url" in
        sqlite:*)
            local file="${url#sqlite://}"; file="${file%%\?*}"
            sqlite3 -separator $'\t' "$file" "$q" ;;
        mysql:*|mariadb:*)
            if [[ "$url" =~ ^[a-z]+://(([^:@/]+)(:([^@/]*))?@)?([^:/?]+)(:([0-9]+))?/([^?]+) ]]; then
                MYSQL_PWD="${BASH_REMATCH[4]}" mysql -N -B -h "${BASH_REMATCH[5]}" \
                    -P "${BASH_REMATCH[7]:-3306}" -u "${BASH_REMATCH[2]:-root}" \
                    "${BASH_REMATCH[8]}" -e "$q"
            else
                echo "cannot parse $url" >&2; return 1
            fi ;;
        postgres:*|postgresql:*)
            psql -X -q -A -t -F $'\t' "$url" -c "$q" ;;
    esac
}

# The server-side count of connections dropped without a goodbye, when there is one.
aborted() { # url
    case "$1" in
        mysql:*|mariadb:*) sql "$1" "SHOW GLOBAL STATUS LIKE 'Aborted_clients'" | cut -f2 ;;
        postgres:*|postgresql:*)
            sql "$1" "SELECT sessions_abandoned FROM pg_stat_database WHERE datname = current_database()" ;;
        *) echo "-" ;;
    esac
}

# One run: start, load, signal, compare. Prints "name value" lines into $SCRATCH/$mode.out.
run() { # TERM|KILL
    local mode="$1" dir="$SCRATCH/$1" prefix="k9_${1,,}_$$_"
    mkdir -p "$dir"
    local db="$DB"
    [ -n "$db" ] || db="sqlite://$dir/ledger.db?mode=rwc"
    local args=(--listen 127.0.0.1:0 --db "$db" --table-prefix "$prefix"
                --audit-file "$dir/audit.log" --shutdown-timeout 10s)
    [ -z "$REDIS" ] || args+=(--redis "$REDIS")
    local aborted_before; aborted_before="$(aborted "$db")"

    "$GRACE_DEMO" "${args[@]}" >"$dir/stdout" 2>"$dir/stderr" &
    local pid=$!
    PIDS+=("$pid")
    local addr=""
    for _ in $(seq 1 300); do
        addr="$(sed -n 's/^listening on //p' "$dir/stdout")"
        [ -z "$addr" ] || break
        sleep 0.1
    done
    [ -n "$addr" ] || { cat "$dir/stderr" >&2; echo "grace-demo did not start" >&2; exit 1; }

    for i in $(seq 0 9); do
        curl -sf -o /dev/null -X POST "http://$addr/accounts" -d "{\"id\":\"acct$i\",\"balance\":100000}"
    done

    # Each worker: transfers until the listener refuses it. Records ids answered 200 and
    # requests that got no answer at all.
    for w in $(seq 1 "$WORKERS"); do
        (
            n=$w
            while :; do
                from=$(( (n * 7) % 10 )); to=$(( (from + 1 + n % 9) % 10 )); n=$((n + WORKERS))
                set +e
                out="$(curl -s --max-time 10 -w '\n%{http_code}' -X POST "http://$addr/transfers" \
                    -d "{\"from\":\"acct$from\",\"to\":\"acct$to\",\"amount\":$(( 1 + n % 50 ))}")"
                rc=$?
                set -e
                case $rc in
                    0) code="${out##*$'\n'}"
                       if [ "$code" = 200 ]; then
                           id="${out%$'\n'*}"; id="${id#*\"id\":\"}"; echo "${id%%\"*}" >>"$dir/answered.$w"
                       fi ;;
                    7) break ;;                           # refused: the listener is gone
                    *) echo x >>"$dir/lost.$w" ;;         # reset, empty reply, timeout
                esac
            done
        ) &
    done
    sleep "$SECONDS_OF_LOAD"
    local t0; t0=$(date +%s%N)
    kill "-$mode" "$pid"
    set +e; wait "$pid"; local code=$?; set -e
    local took=$(( ($(date +%s%N) - t0) / 1000000 ))
    wait # the workers end when the listener refuses them
    sleep 0.3

    local wal="-"
    case "$db" in
        sqlite:*) local f="${db#sqlite://}"; f="${f%%\?*}"
                  wal=""
                  for x in "$f-wal" "$f-shm" "$f-journal"; do
                      if [ -e "$x" ]; then wal+="${x##*.}($(stat -c %s "$x")B) "; fi
                  done
                  wal="${wal:-none}" ;;
    esac
    cat "$dir"/answered.* 2>/dev/null | sort -u >"$dir/answered" || true
    sql "$db" "SELECT id FROM ${prefix}transfers" | sort -u >"$dir/db_ids"
    sed -n 's/.*"id":"\([^"]*\)".*/\1/p' "$dir/audit.log" | sort -u >"$dir/audit_ids"
    local events="-"
    if [ -n "$REDIS" ]; then
        events="$(redis-cli -u "$REDIS" LLEN "${prefix}events")"
        redis-cli -u "$REDIS" DEL "${prefix}events" >/dev/null
    fi
    local sum; sum="$(sql "$db" "SELECT SUM(balance) FROM ${prefix}accounts")"
    {
        echo "exit_code $code"
        echo "signal_to_exit_ms $took"
        echo "answered_200 $(wc -l <"$dir/answered")"
        echo "no_answer $(cat "$dir"/lost.* 2>/dev/null | wc -l)"
        echo "in_database $(wc -l <"$dir/db_ids")"
        echo "in_audit_file $(wc -l <"$dir/audit_ids")"
        echo "in_redis_list $events"
        echo "committed_never_answered $(comm -13 "$dir/answered" "$dir/db_ids" | wc -l)"
        echo "answered_missing_from_db $(comm -23 "$dir/answered" "$dir/db_ids" | wc -l)"
        echo "answered_missing_from_audit $(comm -23 "$dir/answered" "$dir/audit_ids" | wc -l)"
        echo "sum_of_balances $sum"
        echo "sqlite_leftovers $wal"
        echo "aborted_connections_on_server $(( $(aborted "$db" | sed 's/^-$/0/') - $(echo "$aborted_before" | sed 's/^-$/0/') ))"
    } >"$SCRATCH/$mode.out"
    case "$db" in
        sqlite:*) ;;
        *) for t in transfers accounts settlements; do sql "$db" "DROP TABLE IF EXISTS ${prefix}$t" >/dev/null; done ;;
    esac
}

echo "grace-demo under ${WORKERS} curl loops for ${SECONDS_OF_LOAD}s, then a signal (db: ${DB:-embedded SQLite}${REDIS:+, redis: $REDIS})"
run TERM
run KILL
printf '\n%-30s %14s %14s\n' "" "SIGTERM" "kill -9"
paste "$SCRATCH/TERM.out" "$SCRATCH/KILL.out" | while IFS=$'\t' read -r a b; do
    printf '%-30s %14s %14s\n' "${a%% *}" "${a#* }" "${b#* }"
done
cat <<'EOF'

SIGTERM drains: every request in flight is answered, the settlement job finishes, the audit
file is flushed and fsynced, Redis gets QUIT and each database connection its goodbye, so
answers, rows and audit lines agree. kill -9 cuts all of that: clients in flight never hear
back although their transfers may be committed (they will retry and pay twice), the audit
file loses what was still in its buffer, and the database sees aborted connections (and,
with SQLite, the WAL is left for the next start to recover).
EOF
