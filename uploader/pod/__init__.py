"""Deckhouse's uploader pod: `dvcr-uploader` with no subcommand and
`UPLOADER_DESTINATION_ENDPOINT` set receives one image and pushes it to that reference, as
Deckhouse's `dvcr-uploader` binary does (docs/uploader-pod.md).

It runs the server's own upload machinery (uploader/server: Images, the upload-URL
handlers), with one image created at start whose storage is the given reference
(destination.py) and whose upload token the pod's fixed paths use (routes.py). The
other way, driving importer/'s transfer with the request body as its source, would need
again what the server already has around that transfer: the upload feed that lets a
dropped `PUT` continue from `HEAD`'s `Upload-Offset` (`Content-Range`, tus), the
admission of each request before its body (offsets, lengths, 100 Continue), and the
image's phases that tell an invalid image (422, never tagged) from a broken connection.
Reusing them is a storage subclass and a few handlers; rebuilding them would be a second
upload server.

- options.py: the flags and variables, with Deckhouse's defaults, checked at start;
- tls.py: the server certificate, CDI's cipher and version settings, mTLS;
- destination.py: the reference, its credentials and TLS, and the storage that uses them;
- checksums.py: `UPLOADER_CHECKSUMS`, each algorithm checked where it can be;
- routes.py: the upload paths, `/healthz`, `/metrics`;
- metricstls.py: the metrics listener's throwaway self-signed certificate;
- termination.py: the termination message;
- run.py: start, wait for the verdict, write the message, exit.
"""
