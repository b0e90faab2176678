# shellcheck shell=bash
# What runs the image, and what is not in it. Sourced by .ci/container; uses lib.sh and
# IMAGE (the built image's name).

smoke_image_hygiene() {
    local user uid
    user=$("${BUILDAH[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE")
    [[ $user == 10001:10001 ]] || fail "the image's user is '$user', not 10001:10001"
    uid=$(in_image -- id -u)
    [[ $uid == 10001 ]] || fail "the image runs as uid $uid"
    in_image --user 0:0 -v "$SMOKE:/smoke:ro" -- sh /smoke/hygiene-in-image.sh ||
        fail "the image holds what it should not (above)"
    echo "image: runs as 10001:10001; no compiler, pip, pip cache, wheels or sources in it"
}
