// The page of the server's API listener: images as a live table (the watch API), create,
// details, delete, and uploads that continue from the server's offset after any break.
"use strict";

const PREFIX = "/apis/virtualization.deckhouse.io/v1alpha2";
// Each part of an upload is one Content-Range PUT; large parts run near full speed.
const CHUNK = 64 * 1024 * 1024;
// The upload's bar and figures are drawn at most this often. Chromium reports progress
// every 50 ms, and each drawing costs a style, layout and paint: CPU that the browser's
// own upload path (file reads and 16 KiB socket writes in two other processes) needs.
const PAINT_EVERY_MS = 250;
const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem("dvcr-token") || "",
  namespace: localStorage.getItem("dvcr-namespace") || "default",
  kind: "vi",
  images: new Map(),
  selected: null,
  watch: null,
  upload: null,
  eventsOf: null, // the image and version whose events the table shows
};

class Unauthorized extends Error {}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    askForToken(state.token ? "The token was refused; give another." : "");
    throw new Unauthorized("this server asks for a token");
  }
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.message || `${response.status} ${response.statusText}`);
  return answer;
}

function collectionPath() {
  return state.kind === "cvi"
    ? `${PREFIX}/clustervirtualimages`
    : `${PREFIX}/namespaces/${encodeURIComponent(state.namespace)}/virtualimages`;
}

// -- the token ------------------------------------------------------------------------------

function askForToken(problem) {
  $("token-section").hidden = false;
  $("token-problem").textContent = problem;
  $("token").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem("dvcr-token", state.token);
  $("token").value = "";
  $("token-section").hidden = true;
  startWatch();
});

// -- the live table -------------------------------------------------------------------------

async function startWatch() {
  if (state.watch) state.watch.abort();
  const controller = new AbortController();
  state.watch = controller;
  state.images.clear();
  render();
  $("list-status").textContent = "Loading…";
  while (!controller.signal.aborted) {
    try {
      await readWatch(controller.signal);
    } catch (error) {
      if (controller.signal.aborted || error instanceof Unauthorized) return;
      if (error.final) {
        state.images.clear();
        render();
        $("list-status").textContent = error.message;
        return;
      }
      $("list-status").textContent = `Connection lost (${error.message}); trying again…`;
    }
    await sleep(1000);
  }
}

async function readWatch(signal) {
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  const response = await fetch(`${collectionPath()}?watch=true`, { headers, signal });
  if (response.status === 401) {
    askForToken(state.token ? "The token was refused; give another." : "");
    throw new Unauthorized("token");
  }
  if (!response.ok) {
    const answer = await response.json().catch(() => ({}));
    const error = new Error(answer.message || response.statusText);
    error.final = response.status === 403 || response.status === 404;
    if (response.status === 403) error.message = `Forbidden: ${error.message}`;
    throw error;
  }
  state.images.clear();
  $("list-status").textContent = "";
  render();
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the watch ended");
    buffered += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      if (line.trim()) applyEvent(JSON.parse(line));
    }
  }
}

function applyEvent(event) {
  const name = event.object.metadata.name;
  if (event.type === "DELETED") state.images.delete(name);
  else state.images.set(name, event.object);
  render();
}

function age(timestamp) {
  const seconds = Math.max(0, (Date.now() - Date.parse(timestamp)) / 1000);
  if (seconds < 120) return `${Math.floor(seconds)}s`;
  if (seconds < 7200) return `${Math.floor(seconds / 60)}m`;
  if (seconds < 172800) return `${Math.floor(seconds / 3600)}h`;
  return `${Math.floor(seconds / 86400)}d`;
}

function cell(row, content) {
  const td = row.insertCell();
  if (content instanceof Node) td.append(content);
  else td.textContent = content ?? "";
  return td;
}

function render() {
  const body = $("images").tBodies[0];
  body.replaceChildren();
  const names = [...state.images.keys()].sort();
  for (const name of names) {
    const image = state.images.get(name);
    const status = image.status || {};
    const row = body.insertRow();
    row.dataset.name = name;
    if (name === state.selected) row.classList.add("selected");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "row-name";
    button.textContent = name;
    button.addEventListener("click", () => select(name));
    cell(row, button);
    cell(row, status.phase);
    const bar = document.createElement("progress");
    bar.max = 100;
    bar.value = parseFloat(status.progress || "0") || 0;
    bar.setAttribute("aria-label", `${name} progress ${status.progress || "0%"}`);
    cell(row, bar).append(` ${status.progress || ""}`);
    cell(row, status.downloadSpeed?.current || "");
    cell(row, status.size?.unpacked || "");
    cell(row, status.format || "");
    cell(row, image.metadata.creationTimestamp ? age(image.metadata.creationTimestamp) : "");
  }
  if (!names.length && !$("list-status").textContent) {
    $("list-status").textContent = "No images here yet.";
  } else if (names.length && $("list-status").textContent === "No images here yet.") {
    $("list-status").textContent = "";
  }
  renderDetails();
}

// -- one image ------------------------------------------------------------------------------

function select(name) {
  state.selected = name;
  render();
  $("details").hidden = false;
  $("details-title").focus?.();
}

function field(list, term, value) {
  const dt = document.createElement("dt");
  dt.textContent = term;
  const dd = document.createElement("dd");
  if (value instanceof Node) dd.append(value);
  else dd.textContent = value ?? "";
  list.append(dt, dd);
}

function renderDetails() {
  const image = state.images.get(state.selected);
  if (!image) {
    $("details").hidden = true;
    return;
  }
  const status = image.status || {};
  $("details-title").textContent = `Image ${image.metadata.name}`;
  const list = $("details-fields");
  list.replaceChildren();
  field(list, "Phase", status.phase);
  for (const condition of status.conditions || []) {
    field(list, `Condition ${condition.type}`, `${condition.status}, ${condition.reason}: ${condition.message}`);
  }
  field(list, "Storage", image.spec.storage);
  field(list, "Data source", image.spec.dataSource.type);
  if (status.format) field(list, "Format", status.format);
  if (status.size) field(list, "Size", `${status.size.stored} stored, ${status.size.unpacked} unpacked`);
  for (const [algorithm, digest] of Object.entries(status.checksum || {})) {
    field(list, algorithm, digest);
  }
  if (status.target) field(list, "Target", Object.values(status.target).join(" "));
  const url = status.imageUploadURLs?.external;
  const uploading = url && status.phase !== "Ready" && status.phase !== "Failed";
  if (url) {
    const code = document.createElement("code");
    code.textContent = `curl -T FILE '${url}'`;
    field(list, "Upload with curl", code);
  }
  $("upload").hidden = !uploading && !(state.upload && state.upload.name === image.metadata.name);
  refreshEvents(image);
}

// The image's events (what `describe` shows), read again when the image changes.
async function refreshEvents(image) {
  const version = `${image.metadata.name}@${image.metadata.resourceVersion}`;
  if (state.eventsOf === version) return;
  state.eventsOf = version;
  const path = `${collectionPath()}/${encodeURIComponent(image.metadata.name)}/events`;
  let list;
  try {
    list = await api("GET", path);
  } catch (error) {
    if (state.eventsOf === version) $("events-status").textContent = `Events not read: ${error.message}`;
    return;
  }
  if (state.eventsOf !== version) return; // another image, or a newer version, came first
  $("events-status").textContent = list.items.length ? "" : "No events yet.";
  const body = $("events").tBodies[0];
  body.replaceChildren();
  for (const event of [...list.items].reverse()) {
    const row = body.insertRow();
    cell(row, event.type);
    cell(row, event.reason);
    const count = event.count > 1 ? ` (x${event.count})` : "";
    cell(row, event.lastTimestamp ? age(event.lastTimestamp) + count : "");
    cell(row, event.message);
  }
}

$("delete").addEventListener("click", async () => {
  const name = state.selected;
  if (!name || !confirm(`Delete the image ${name}?`)) return;
  try {
    await api("DELETE", `${collectionPath()}/${encodeURIComponent(name)}`);
    state.selected = null;
    render();
  } catch (error) {
    $("list-status").textContent = `Not deleted: ${error.message}`;
  }
});

// -- uploads --------------------------------------------------------------------------------

function timeLeft(seconds) {
  if (seconds < 1) return "under a second left";
  if (seconds < 90) return `about ${Math.round(seconds)} s left`;
  if (seconds < 5400) return `about ${Math.round(seconds / 60)} min left`;
  return `about ${(seconds / 3600).toFixed(1)} h left`;
}

function formatBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

class Upload {
  constructor(name, url, file) {
    this.name = name;
    this.url = url;
    this.file = file;
    this.offset = 0;
    this.paused = false;
    this.request = null;
    this.startedAt = 0;
    this.sentThisRun = 0;
    this.sentInPart = 0;
    this.paintTimer = null;
    this.running = false;
  }

  // A message replaces the figures; a drawing still pending would overwrite it.
  show(text) {
    clearTimeout(this.paintTimer);
    this.paintTimer = null;
    $("upload-status").textContent = text;
  }

  progress(sentInPart) {
    this.sentInPart = sentInPart;
    if (this.paintTimer !== null) return;
    this.paintTimer = setTimeout(() => {
      this.paintTimer = null;
      this.paint();
    }, PAINT_EVERY_MS);
  }

  paint() {
    const sentInPart = this.sentInPart;
    const done = this.offset + sentInPart;
    const size = this.file.size || 1;
    $("upload-progress").value = (done / size) * 100;
    const seconds = (performance.now() - this.startedAt) / 1000;
    const speed = seconds > 0 ? (this.sentThisRun + sentInPart) / seconds : 0;
    const left = speed > 0 ? (this.file.size - done) / speed : null;
    $("upload-status").textContent =
      `${formatBytes(done)} of ${formatBytes(this.file.size)}` +
      (speed ? `, ${formatBytes(speed)}/s` : "") +
      (left !== null ? `, ${timeLeft(left)}` : "");
  }

  async serverOffset() {
    const response = await fetch(this.url, { method: "HEAD", cache: "no-store" });
    if (!response.ok) {
      const why = response.status === 409 ? "the image is already Ready" : `${response.status}`;
      throw new Error(`the server refuses this upload: ${why}`);
    }
    const length = response.headers.get("Upload-Length");
    if (length !== null && Number(length) !== this.file.size) {
      throw new Error(`this upload is ${length} bytes long; the file picked is ${this.file.size}`);
    }
    return Number(response.headers.get("Upload-Offset") || "0");
  }

  async run() {
    this.running = true;
    uploadButtons();
    try {
      await this.attempts();
    } finally {
      this.running = false;
      uploadButtons();
    }
  }

  async attempts() {
    this.paused = false;
    this.startedAt = performance.now();
    this.sentThisRun = 0;
    let failures = 0;
    let known = false; // the offset is the server's own answer to the last part
    while (!this.paused) {
      try {
        if (!known) this.offset = await this.serverOffset();
        if (this.offset >= this.file.size && this.file.size > 0) {
          const image = state.images.get(this.name);
          if (image?.status?.phase === "Ready") return this.finished();
        }
        if (this.offset > 0 && this.sentThisRun === 0) {
          $("upload-resumed").textContent =
            `Continued at byte ${this.offset}: ${formatBytes(this.offset)} were already on the server.`;
        }
        const done = await this.sendPart();
        failures = 0;
        known = true;
        if (done) return this.finished();
      } catch (error) {
        known = false;
        if (this.paused) break;
        if (error.fatal) return this.failed(error.message);
        failures += 1;
        const wait = Math.min(30, 2 ** Math.min(failures, 5));
        this.show(`The connection broke (${error.message}); trying again in ${wait} s…`);
        await sleep(wait * 1000);
      }
    }
    this.show(`Paused at byte ${this.offset}; press Upload to continue.`);
  }

  sendPart() {
    const start = this.offset;
    const end = Math.min(this.file.size, start + CHUNK);
    return new Promise((resolve, reject) => {
      const request = new XMLHttpRequest();
      this.request = request;
      request.open("PUT", this.url);
      request.setRequestHeader("Content-Range", `bytes ${start}-${end - 1}/${this.file.size}`);
      request.upload.onprogress = (event) => this.progress(event.loaded);
      request.onerror = () => reject(new Error("network error"));
      request.onabort = () => reject(new Error("paused"));
      request.onload = () => {
        this.sentInPart = 0;
        const offset = request.getResponseHeader("Upload-Offset");
        if (request.status === 200) {
          this.sentThisRun += end - start;
          this.offset = this.file.size;
          resolve(true);
        } else if (request.status === 204) {
          this.sentThisRun += end - start;
          this.offset = Number(offset ?? end);
          resolve(false);
        } else if ((request.status === 416 || request.status === 409) && offset !== null) {
          this.offset = Number(offset);
          resolve(false);
        } else {
          let message = `${request.status}`;
          try {
            message = JSON.parse(request.responseText).message || message;
          } catch (_) {
            // not a Status object
          }
          const error = new Error(message);
          error.fatal = request.status >= 400 && request.status < 500 && request.status !== 408;
          reject(error);
        }
      };
      request.send(this.file.slice(start, end));
    });
  }

  pause() {
    this.paused = true;
    if (this.request) this.request.abort();
  }

  finished() {
    $("upload-progress").value = 100;
    this.show(`Uploaded ${formatBytes(this.file.size)}; the server checks and stores it.`);
    localStorage.removeItem(`dvcr-upload:${this.url}`);
    uploadButtons();
  }

  failed(message) {
    this.show(`The upload failed: ${message}`);
    uploadButtons();
  }
}

function uploadButtons() {
  const running = Boolean(state.upload?.running);
  $("start").disabled = running || !$("file").files.length;
  $("pause").disabled = !running;
}

function pickedFile(file) {
  const image = state.images.get(state.selected);
  const url = image?.status?.imageUploadURLs?.external;
  if (!file || !url) return;
  const key = `dvcr-upload:${url}`;
  const fingerprint = `${file.name}|${file.size}|${file.lastModified}`;
  const earlier = localStorage.getItem(key);
  if (earlier && earlier !== fingerprint) {
    $("upload-status").textContent =
      `This upload was started with ${earlier.split("|")[0]}; pick that file to continue it.`;
  } else {
    $("upload-status").textContent = `${file.name}, ${formatBytes(file.size)}: press Upload.`;
  }
  $("upload-resumed").textContent = "";
  state.upload = new Upload(image.metadata.name, url, file);
  uploadButtons();
}

$("file").addEventListener("change", () => pickedFile($("file").files[0]));

$("start").addEventListener("click", () => {
  const upload = state.upload;
  if (!upload) return;
  localStorage.setItem(
    `dvcr-upload:${upload.url}`,
    `${upload.file.name}|${upload.file.size}|${upload.file.lastModified}`,
  );
  upload.run();
});

$("pause").addEventListener("click", () => {
  state.upload?.pause();
  $("pause").disabled = true;
  $("start").focus();
});

const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) {
    const transfer = new DataTransfer();
    transfer.items.add(file);
    $("file").files = transfer.files;
    pickedFile(file);
  }
});

// -- create ---------------------------------------------------------------------------------

function showSourceFields() {
  const source = $("create-source").value;
  for (const set of document.querySelectorAll("fieldset[data-source]")) {
    set.hidden = set.dataset.source !== source;
  }
}
$("create-source").addEventListener("change", showSourceFields);

function manifestFromForm() {
  const form = $("create");
  const value = (name) => form.elements[name].value.trim();
  const type = value("source");
  const dataSource = { type };
  if (type === "HTTP") {
    dataSource.http = { url: value("url") };
    if (value("sha256")) dataSource.http.checksum = { sha256: value("sha256").toLowerCase() };
  } else if (type === "ContainerImage") {
    dataSource.containerImage = { image: value("image") };
  } else if (type === "ObjectRef") {
    dataSource.objectRef = { kind: value("refKind"), name: value("refName") };
  }
  return {
    apiVersion: "virtualization.deckhouse.io/v1alpha2",
    kind: state.kind === "cvi" ? "ClusterVirtualImage" : "VirtualImage",
    metadata: { name: value("name") },
    spec: { storage: value("storage"), dataSource },
  };
}

$("create").addEventListener("submit", async (event) => {
  event.preventDefault();
  const manifest = manifestFromForm();
  try {
    await api("POST", collectionPath(), manifest);
    $("create-status").textContent = `Created ${manifest.metadata.name}.`;
    $("create").reset();
    showSourceFields();
    select(manifest.metadata.name);
  } catch (error) {
    $("create-status").textContent = `Not created: ${error.message}`;
  }
});

// -- scope ----------------------------------------------------------------------------------

$("scope").addEventListener("submit", (event) => {
  event.preventDefault();
  state.namespace = $("namespace").value.trim() || "default";
  state.kind = $("kind").value;
  localStorage.setItem("dvcr-namespace", state.namespace);
  state.selected = null;
  startWatch();
});

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

$("namespace").value = state.namespace;
showSourceFields();
setInterval(render, 10000);
startWatch();
