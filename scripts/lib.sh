# Helpers shared by the scripts that start services on 127.0.0.1 and drive them (sourced, not run).
#
# The sourcing script sets `LOG_NAME` (the prefix of its messages) and `WORK` (a scratch directory
# whose `*.log` files `die` prints the tails of) before it sources this file.

log() { echo "$LOG_NAME: $*" >&2; }

# Fails the script: the message, then the last 30 lines of every log in `$WORK`.
die() {
    log "FAILED: $*"
    for f in "$WORK"/*.log; do
        [ -f "$f" ] || continue
        echo "----- $(basename "$f") (last 30 lines)" >&2
        tail -n 30 "$f" >&2
    done
    exit 1
}

# Stops one process this script started: TERM, up to 10 s, then KILL.
stop_pid() {
    local pid="$1"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
}

# A TCP port that was free on 127.0.0.1 a moment ago.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Waits until something accepts TCP connections on 127.0.0.1:$1, for at most $2 seconds.
wait_port() {
    local port="$1" limit="$2" start=$SECONDS
    while ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        [ $((SECONDS - start)) -lt "$limit" ] || return 1
        sleep 0.5
    done
}

# A fresh random token for a run (never a fixed value in a script).
random_token() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
