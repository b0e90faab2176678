#!/bin/sh
# Run inside the image as root (to see everything): what must not be in it, and who owns
# what. Prints each problem and exits 1 if there is one.
set -u
problems=0
problem() {
    echo "image: $*" >&2
    problems=$((problems + 1))
}

for tool in gcc cc c++ g++ clang ld as make pip pip3; do
    found=$(command -v "$tool") && problem "$tool is installed ($found)"
done
/opt/dvcr/bin/python -m pip --version >/dev/null 2>&1 && problem "pip is in /opt/dvcr"
for leftover in /root/.cache /data/.cache /src /wheels; do
    [ -e "$leftover" ] && problem "$leftover is left from the build"
done
# (The base's own ensurepip wheels, which python3 -m venv needs, are not the build's.)
wheels=$(find /opt /data /root /tmp /var /home -xdev -name '*.whl' 2>/dev/null | head -n 5)
[ -z "$wheels" ] || problem "wheel files are left: $wheels"
[ -z "$(ls -A /tmp)" ] || problem "/tmp is not empty: $(ls -A /tmp)"

writable=$(find /opt/dvcr /usr -xdev \( -perm -o+w -o ! -user root \) ! -type l 2>/dev/null |
    head -n 5)
[ -z "$writable" ] || problem "code that is not root's or that anyone may change: $writable"
[ "$(stat -c %u:%g /data)" = 10001:10001 ] || problem "/data belongs to $(stat -c %u:%g /data)"

for program in dvcr-uploader dvcr-importer; do
    [ "$(readlink -f "/usr/local/bin/$program")" = "/opt/dvcr/bin/$program" ] ||
        problem "/usr/local/bin/$program does not lead to /opt/dvcr/bin/$program"
done
/usr/local/bin/dvcr-uploader --version >/dev/null || problem "dvcr-uploader --version failed"
/usr/local/bin/dvcr-importer --help >/dev/null || problem "dvcr-importer --help failed"

[ "$problems" -eq 0 ]
