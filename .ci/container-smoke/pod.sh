# shellcheck shell=bash
# Deckhouse's uploader pod: `/usr/local/bin/dvcr-uploader -v=3` with the controller's
# environment, as uid 64535 with only /tmp writable, takes one `curl -T` on /upload, pushes
# it to the local registry and exits 0. Sourced by .ci/container; uses lib.sh, DISK and
# REGISTRY (host:port of the local docker-registry).

smoke_uploader_pod() {
    local tmp="$WORK/pod-tmp" log="$WORK/pod.log" uid="0c7d3a52-5b1e-4d8f-9a26-3e4b5c6d7e8f"
    local port healthz metrics pid status destination answer
    owned_dir "$tmp" 64535
    port=$(free_port)
    healthz=$(free_port)
    metrics=$(free_port)
    destination="$REGISTRY/vi/smoke/pod-upload:$uid"

    # Loopback and free ports instead of the defaults (0.0.0.0, 8444, 8080, 8443): the CI
    # machine is shared. The termination message goes to /tmp: the pod's /dev is not ours.
    in_image --user 64535:64535 -v "$tmp:/tmp" \
        --env LISTEN_ADDRESS=127.0.0.1 --env LISTEN_PORT="$port" --env HEALTHZ_PORT="$healthz" \
        --env UPLOADER_METRICS_LISTEN="127.0.0.1:$metrics" \
        --env UPLOADER_DESTINATION_ENDPOINT="$destination" \
        --env DESTINATION_INSECURE_TLS=true --env OWNER_UID="$uid" -- \
        /usr/local/bin/dvcr-uploader -v=3 --termination-message-path /tmp/termination-log \
        >"$log" 2>&1 &
    pid=$!
    BACKGROUND+=("$pid")
    if ! wait_for_http "http://127.0.0.1:$healthz/healthz" 60 "$pid"; then
        show_log "$log"
        fail "the uploader pod mode did not start: dvcr-uploader without a subcommand and" \
            "with UPLOADER_DESTINATION_ENDPOINT set exited before /healthz answered (log above)"
    fi

    answer=$(curl -sS --fail-with-body -T "$DISK" "http://127.0.0.1:$port/upload") ||
        { show_log "$log"; fail "the upload to the pod failed: $answer"; }
    echo "curl -T: $answer"
    status=0
    wait_exit "$pid" 60 || status=$?
    ((status == 0)) || { show_log "$log"; fail "the pod exited $status after the upload"; }

    # Exit 0 is also the answer to an image found invalid: the registry and the termination
    # message tell the two apart.
    registry_inspect "$destination" "$WORK/pod-pushed.json"
    [[ $(json_get "$WORK/pod-pushed.json" 'd["Labels"]["source-image-format"]') == qcow2 ]] ||
        fail "the pushed image's labels: $(cat "$WORK/pod-pushed.json")"
    grep -q qcow2 "$tmp/termination-log" ||
        fail "termination message: $(cat "$tmp/termination-log" 2>&1)"
    echo "uploader pod: upload pushed to $destination, exit 0"
}
