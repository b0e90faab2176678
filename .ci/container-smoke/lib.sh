# shellcheck shell=bash
# Helpers of the smoke tests of the image, sourced by .ci/container. They use its globals:
# WORK (the temporary directory), SMOKE (this directory), BUILDAH (the buildah command with its storage), CTR (a
# working container of the image), READ_ONLY (buildah run options that mount the image's
# /usr, /opt and /var read-only) and BACKGROUND (process ids that cleanup stops).

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# in_image [buildah run options...] -- COMMAND...: runs COMMAND in the image, on the host's
# network (the default of `buildah run` is a network of its own, out of the host's reach),
# with the image's code read-only, as the image's user unless --user is given.
in_image() {
    local options=()
    while [[ $# -gt 0 && $1 != -- ]]; do
        options+=("$1")
        shift
    done
    [[ $# -gt 0 ]] || fail "in_image: no -- before the command"
    shift
    "${BUILDAH[@]}" run --isolation chroot --network host "${READ_ONLY[@]}" "${options[@]}" \
        "$CTR" -- "$@"
}

# A directory for /tmp or /data in the image, writable by UID only, as an emptyDir is.
owned_dir() {  # owned_dir PATH UID
    mkdir -p "$1"
    chown "$2:$2" "$1"
    chmod 0700 "$1"
}

# wait_for_http URL SECONDS PID: until URL answers 2xx; fails at once if PID exits first.
wait_for_http() {
    local deadline=$((SECONDS + $2))
    until curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; do
        kill -0 "$3" 2>/dev/null || return 1
        ((SECONDS < deadline)) || fail "nothing answered at $1 within $2 s"
        sleep 0.2
    done
}

# wait_exit PID SECONDS: the process's exit status; 124 when it runs longer.
wait_exit() {
    local deadline=$((SECONDS + $2))
    while kill -0 "$1" 2>/dev/null; do
        ((SECONDS < deadline)) || return 124
        sleep 0.2
    done
    wait "$1"
}

# json_get FILE EXPRESSION: a Python expression over `d`, the file's JSON.
json_get() {
    python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"
}

show_log() {  # show_log FILE: its last lines, for a failure's context
    echo "--- last lines of $1:" >&2
    tail -n 30 "$1" >&2 || true
}

# registry_inspect REFERENCE OUTPUT: skopeo's view of an image in the local registry.
registry_inspect() {
    skopeo inspect --tls-verify=false "docker://$1" >"$2" ||
        fail "$1 is not in the registry"
}
