# The server, slim and non-root. Data (state, PVC claims, the embedded DVCR) lives in /data.
# It listens beyond loopback, so its API needs a bearer token: the admin token it writes to
# /data/admin.token on first start, or the tokens of a file given with --api-token-file.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /data --create-home dvcr
WORKDIR /src
COPY pyproject.toml README.md ./
COPY importer ./importer
COPY uploader ./uploader
RUN pip install --no-cache-dir . && rm -rf /src

USER 10001
WORKDIR /data
EXPOSE 8444
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8444/healthz')"
ENTRYPOINT ["dvcr-uploader", "serve"]
CMD ["--listen", "0.0.0.0:8444", "--data-dir", "/data"]
