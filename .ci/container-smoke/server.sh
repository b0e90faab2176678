# shellcheck shell=bash
# The README's walk-through against the server in the image: `dvcr-uploader serve` on the
# embedded defaults, the client commands run in the image, the upload with curl from the
# host. Sourced by .ci/container; uses lib.sh and DISK (a small qcow2 image).

smoke_server() {
    local data="$WORK/server-data" tmp="$WORK/server-tmp" log="$WORK/server.log"
    local port server pid url registry_url answer
    owned_dir "$data" 10001
    owned_dir "$tmp" 10001
    port=$(free_port)
    server="http://127.0.0.1:$port"

    # The shell records its pid, which exec hands to the server: the host stops it with
    # SIGTERM, as the kubelet does (buildah forwards no signal, it kills).
    in_image -v "$data:/data" -v "$tmp:/tmp" -- \
        sh -c 'echo $$ >/data/server.pid && exec dvcr-uploader serve "$@"' sh \
        --listen "127.0.0.1:$port" --data-dir /data >"$log" 2>&1 &
    pid=$!
    BACKGROUND+=("$pid")
    wait_for_http "$server/healthz" 60 "$pid" || { show_log "$log"; fail "the server did not start"; }

    server_client() { in_image -v "$SMOKE:/smoke:ro" -- dvcr-uploader --server "$server" "$@"; }
    server_client apply -f /smoke/virtualimage.yaml
    server_client wait vi/smoke-upload --for=jsonpath='{.status.phase}'=WaitForUserUpload --timeout=30s
    url=$(server_client get vi smoke-upload -o jsonpath='{.status.imageUploadURLs.external}')
    [[ $url == "$server/upload/"* ]] || fail "upload URL: $url"

    answer=$(curl -sS --fail-with-body -T "$DISK" "$url")
    echo "curl -T: $answer"
    [[ $answer == *'"phase": "Ready"'* ]] || fail "the upload did not end Ready: $answer"
    [[ $answer == *"$(sha256sum "$DISK" | cut -d' ' -f1)"* ]] || fail "sha256 differs: $answer"
    server_client wait vi/smoke-upload --for=condition=Ready --timeout=60s
    server_client get vi smoke-upload -o wide

    # The image is in the embedded DVCR, an OCI layout that skopeo reads from the host.
    registry_url=$(server_client get vi smoke-upload -o jsonpath='{.status.target.registryURL}')
    [[ $registry_url == oci:/data/dvcr:vi/default/smoke-upload:* ]] || fail "target: $registry_url"
    skopeo inspect "oci:$data/${registry_url#oci:/data/}" >"$WORK/server-dvcr.json"
    [[ $(json_get "$WORK/server-dvcr.json" 'd["Labels"]["source-image-format"]') == qcow2 ]] ||
        fail "the DVCR image's labels: $(cat "$WORK/server-dvcr.json")"

    kill -TERM "$(cat "$data/server.pid")"
    wait_exit "$pid" 30 || { show_log "$log"; fail "the server did not stop cleanly on SIGTERM"; }
    [[ -z $(ls -A "$tmp") ]] || fail "the server left files in /tmp: $(ls -A "$tmp")"
    echo "server: walk-through passed (upload Ready, DVCR layout read by skopeo, clean stop)"
}
