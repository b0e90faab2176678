# shellcheck shell=bash
# Deckhouse's importer job: `/usr/local/bin/dvcr-importer -v=3` with the controller's
# environment, as uid 64535 with only /tmp writable, downloads the disk over HTTP from the
# host and pushes it to the local registry. Sourced by .ci/container; uses lib.sh, DISK and
# REGISTRY.

smoke_importer() {
    local tmp="$WORK/importer-tmp" files="$WORK/importer-files" log="$WORK/importer.log"
    local uid="5e0f6a1b-2c3d-4e5f-8a9b-0c1d2e3f4a5b" http metrics destination http_pid status
    owned_dir "$tmp" 64535
    mkdir -p "$files"
    cp "$DISK" "$files/disk.qcow2"
    http=$(free_port)
    metrics=$(free_port)
    destination="$REGISTRY/vi/smoke/imported:$uid"

    python3 -m http.server --bind 127.0.0.1 --directory "$files" "$http" \
        >"$WORK/http-server.log" 2>&1 &
    http_pid=$!
    BACKGROUND+=("$http_pid")
    wait_for_http "http://127.0.0.1:$http/disk.qcow2" 30 "$http_pid" ||
        { show_log "$WORK/http-server.log"; fail "the HTTP server did not start"; }

    status=0
    in_image --user 64535:64535 -v "$tmp:/tmp" \
        --env IMPORTER_SOURCE=http --env IMPORTER_ENDPOINT="http://127.0.0.1:$http/disk.qcow2" \
        --env IMPORTER_DESTINATION_ENDPOINT="$destination" --env DESTINATION_INSECURE_TLS=true \
        --env OWNER_UID="$uid" --env IMPORTER_METRICS_LISTEN="127.0.0.1:$metrics" -- \
        /usr/local/bin/dvcr-importer -v=3 --termination-message-path /tmp/termination-log \
        >"$log" 2>&1 || status=$?
    ((status == 0)) || { show_log "$log"; fail "dvcr-importer exited $status"; }

    registry_inspect "$destination" "$WORK/importer-pushed.json"
    [[ $(json_get "$WORK/importer-pushed.json" 'd["Labels"]["source-image-format"]') == qcow2 ]] ||
        fail "the imported image's labels: $(cat "$WORK/importer-pushed.json")"
    [[ $(json_get "$tmp/termination-log" 'd["source-image-format"]') == qcow2 ]] ||
        fail "termination message: $(cat "$tmp/termination-log" 2>&1)"
    echo "importer: $destination imported over HTTP, exit 0"
}
