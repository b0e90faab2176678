// Uploads one file with tus-js-client (Node), as Uppy's tus plugin does, and prints what
// happened as JSON lines on stdout: every request sent ("request": method, Upload-Offset,
// Upload-Length), every answer ("response": status), and the outcome ("success", "aborted"
// or "error"). Its one argument is a JSON object:
//   file         the path of the file
//   endpoint     tus creation: POST there, then PATCH the Location it answers
//   uploadUrl    no creation: HEAD there for the offset, then PATCH
//   chunkSize    bytes per PATCH
//   deferred     Upload-Defer-Length: the length goes with the last PATCH
//   dataDuringCreation  the creation POST carries the first chunk (creation-with-upload)
//   headers      more headers for every request
//   abortAfter   abort (with the PATCH in flight, if any) once the progress passes this
'use strict'

const tus = require('tus-js-client')
const fs = require('node:fs')
const { PassThrough } = require('node:stream')

const args = JSON.parse(process.argv[2])

function say(event, fields) {
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`)
}

// A file's ReadStream is read at any offset (resumable, its size known); a deferred length
// is for a stream whose end is found only by reading it.
const file = args.deferred
  ? fs.createReadStream(args.file).pipe(new PassThrough())
  : fs.createReadStream(args.file)
const options = {
  chunkSize: args.chunkSize,
  retryDelays: [0, 500, 1000, 2000],
  headers: args.headers || {},
  uploadLengthDeferred: Boolean(args.deferred),
  uploadDataDuringCreation: Boolean(args.dataDuringCreation),
  uploadSize: args.deferred ? undefined : fs.statSync(args.file).size,
  storeFingerprintForResuming: false,
  onBeforeRequest(req) {
    say('request', {
      method: req.getMethod(),
      url: req.getURL(),
      offset: req.getHeader('Upload-Offset') ?? null,
      length: req.getHeader('Upload-Length') ?? null,
      deferLength: req.getHeader('Upload-Defer-Length') ?? null,
    })
  },
  onAfterResponse(req, res) {
    say('response', {
      method: req.getMethod(),
      status: res.getStatus(),
      location: res.getHeader('Location') ?? null,
      offset: res.getHeader('Upload-Offset') ?? null,
    })
  },
  onProgress(sent, total) {
    if (args.abortAfter != null && sent >= args.abortAfter && !aborted) {
      aborted = true
      upload.abort().then(() => {
        say('aborted', { sent, url: upload.url })
        process.exit(0)
      })
    }
  },
  onSuccess() {
    say('success', { url: upload.url })
    process.exit(0)
  },
  onError(error) {
    say('error', { message: String(error) })
    process.exit(1)
  },
}
if (args.endpoint) options.endpoint = args.endpoint
if (args.uploadUrl) options.uploadUrl = args.uploadUrl

let aborted = false
const upload = new tus.Upload(file, options)
upload.start()
