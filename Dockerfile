# The image of `dvcr-uploader` (server, client, Deckhouse's uploader pod) and `dvcr-importer`.
#
#   docker build -t dvcr-uploader .                              (wheels from the index)
#   docker build --build-context wheels=DIR -t dvcr-uploader .   (offline, see below)
#   buildah bud --build-arg BASE_IMAGE=debian-python -t dvcr-uploader .
#
# BASE_IMAGE is any Debian-like image with Python 3.11 and its venv module: the default
# python:3.11-slim, or a Debian with python3 and python3-venv (.ci/container builds one).
ARG BASE_IMAGE=python:3.11-slim

# Offline builds: `--build-context wheels=DIR` puts a directory in place of this empty
# stage. DIR is a package index made with `pip wheel --wheel-dir DIR . setuptools` (the
# dependencies and the build backend); when it holds wheels, pip uses nothing else.
FROM scratch AS wheels

FROM ${BASE_IMAGE} AS build
COPY --from=wheels / /wheels/
COPY pyproject.toml README.md /src/
COPY importer /src/importer
COPY uploader /src/uploader
# pip writes the bytecode now (the runtime user cannot, its root filesystem may be read-only)
# and then goes: nothing is installed at run time.
RUN set -eu; \
    python3 -m venv /opt/dvcr; \
    if ls /wheels/*.whl >/dev/null 2>&1; then \
        set -- --no-index --find-links /wheels; \
    fi; \
    /opt/dvcr/bin/python -m pip install --no-cache-dir --disable-pip-version-check \
        --root-user-action=ignore "$@" /src; \
    /opt/dvcr/bin/python -m pip uninstall --yes --quiet --root-user-action=ignore \
        pip setuptools; \
    /opt/dvcr/bin/dvcr-uploader --version

FROM ${BASE_IMAGE}
COPY --from=build /opt/dvcr /opt/dvcr
# Deckhouse's pod specs start /usr/local/bin/dvcr-uploader and /usr/local/bin/dvcr-importer.
RUN set -eu; \
    ln -sf /opt/dvcr/bin/dvcr-uploader /opt/dvcr/bin/dvcr-importer /usr/local/bin/; \
    groupadd --gid 10001 dvcr; \
    useradd --uid 10001 --gid 10001 --home-dir /data --no-create-home --no-log-init \
        --shell /usr/sbin/nologin dvcr; \
    install -d -o 10001 -g 10001 -m 0755 /data; \
    rm -rf /root/.cache /tmp/* /var/tmp/*

ENV PATH=/opt/dvcr/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so that Kubernetes' runAsNonRoot can check it. Any other uid works as well
# (Deckhouse runs its pods as 64535): the working directory is open to all, and only /data
# or /tmp, mounted by the pod, is written.
USER 10001:10001
WORKDIR /data
# 8444: upload URLs and the API; 8080: the uploader pod's /healthz; 8443: /metrics of the
# uploader pod (HTTPS) and the importer job. No HEALTHCHECK: the port to probe depends on the mode; pods have their probes.
EXPOSE 8444 8080 8443
# The program is the entry point and the arguments choose the mode: without arguments the
# server on every address with its data in /data; `dvcr-uploader -v=3` with
# UPLOADER_DESTINATION_ENDPOINT set is Deckhouse's uploader pod; client commands work too
# (`docker run IMAGE get vi --server URL`), and `--entrypoint dvcr-importer` runs the job.
ENTRYPOINT ["dvcr-uploader"]
CMD ["serve", "--listen", "0.0.0.0:8444", "--data-dir", "/data"]
