// Resumable uploads from the browser: tus 1.0 and the chunk API, with pause, resume,
// offline handling and resume after a reload (the upload's URL is kept in localStorage,
// keyed by the file's name, size and modification time; the server says where it stands).

const STORE = "uploadsrv.console.uploads";
const MiB = 1 << 20;
const PARALLEL_CHUNKS = 3;

export class HttpError extends Error {
  constructor(status, text) {
    super(`HTTP ${status}${text ? ": " + text.slice(0, 200) : ""}`);
    this.status = status;
  }
}

class NetworkError extends Error {}

export function fingerprint(file) {
  return [file.name, file.size, file.lastModified].join("/");
}

export function savedUploads() {
  try {
    return JSON.parse(localStorage.getItem(STORE) || "{}");
  } catch {
    return {};
  }
}

function save(file, entry) {
  const all = savedUploads();
  all[fingerprint(file)] = { ...entry, name: file.name, size: file.size, savedAt: Date.now() };
  localStorage.setItem(STORE, JSON.stringify(all));
}

function forget(file) {
  const all = savedUploads();
  delete all[fingerprint(file)];
  localStorage.setItem(STORE, JSON.stringify(all));
}

/** One request with XMLHttpRequest: fetch cannot report upload progress everywhere. */
function request(method, url, { headers = {}, body = null, onProgress, signal } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, url);
    for (const [name, value] of Object.entries(headers)) xhr.setRequestHeader(name, value);
    if (onProgress) xhr.upload.onprogress = (event) => onProgress(event.loaded);
    xhr.onload = () =>
      resolve({ status: xhr.status, header: (name) => xhr.getResponseHeader(name), text: xhr.responseText });
    xhr.onerror = () => reject(new NetworkError(`${method} ${url}: network error`));
    xhr.ontimeout = xhr.onerror;
    xhr.onabort = () => reject(new DOMException("aborted", "AbortError"));
    if (signal) {
      if (signal.aborted) return reject(new DOMException("aborted", "AbortError"));
      signal.addEventListener("abort", () => xhr.abort(), { once: true });
    }
    xhr.send(body);
  });
}

function expect(response, ...statuses) {
  if (!statuses.includes(response.status)) throw new HttpError(response.status, response.text);
  return response;
}

function base64(text) {
  return btoa(String.fromCharCode(...new TextEncoder().encode(text)));
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

function whenOnline(signal) {
  return new Promise((resolve) => {
    if (navigator.onLine) return resolve();
    const done = () => { window.removeEventListener("online", done); resolve(); };
    window.addEventListener("online", done);
    signal.addEventListener("abort", done, { once: true });
  });
}

/**
 * An upload that survives pauses, lost networks and reloads. Events: "state" (detail:
 * {state, message}) and "progress" (detail: {confirmed, inFlight, size}).
 * `bytesSent` counts every body byte handed to the network, resent ones included.
 */
class ResumableUpload extends EventTarget {
  constructor(file, credentials = {}) {
    super();
    this.file = file;
    this.credentials = credentials; // sent with every request (upload URLs may be signed too)
    this.size = file.size;
    this.state = "idle";
    this.bytesSent = 0;
    this.downloadUrl = null;
    this.resumedFrom = null;
    this._controller = null;
    this._onOffline = () => this._controller && this._controller.abort();
  }

  start() {
    if (this.state === "uploading" || this.state === "done") return;
    this._paused = false;
    this._loop();
  }

  pause() {
    this._paused = true;
    if (this._controller) this._controller.abort();
    this._set("paused", "paused; resume continues from the server's offset");
  }

  async _loop() {
    window.addEventListener("offline", this._onOffline);
    let delay = 500;
    try {
      while (!this._paused) {
        this._controller = new AbortController();
        const signal = this._controller.signal;
        if (!navigator.onLine) {
          this._set("offline", "offline: waiting for the network");
          await whenOnline(signal);
          continue;
        }
        try {
          this._set("uploading", "uploading");
          await this.run(signal);
          forget(this.file);
          this._set("done", "done");
          return;
        } catch (error) {
          if (error.name === "AbortError") continue; // paused, or the network went away
          if (error instanceof HttpError && !retryable(error.status)) {
            this._set("failed", error.message);
            return;
          }
          this._set("retrying", `${error.message}; retrying in ${Math.round(delay / 100) / 10} s`);
          await sleep(delay, signal);
          delay = Math.min(delay * 2, 10000);
        }
      }
    } finally {
      window.removeEventListener("offline", this._onOffline);
      this._controller = null;
    }
  }

  _set(state, message) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, message } }));
  }

  _progress(confirmed, inFlight = 0) {
    this.dispatchEvent(new CustomEvent("progress", { detail: { confirmed, inFlight, size: this.size } }));
  }

  _request(method, url, options = {}) {
    return request(method, url, { ...options, headers: { ...this.credentials, ...(options.headers || {}) } });
  }

  /** A body request whose every byte handed to the network counts in bytesSent. */
  async _send(method, url, headers, body, signal, onLoaded) {
    let counted = 0;
    const count = (loaded) => {
      this.bytesSent += loaded - counted;
      counted = loaded;
      if (onLoaded) onLoaded(loaded);
    };
    const response = await this._request(method, url, { headers, body, signal, onProgress: count });
    count(body.size); // an answer means the whole body went (the last progress event may not come)
    return response;
  }
}

function retryable(status) {
  return status === 0 || status === 408 || status === 409 || status === 423 || status === 429 || status >= 500;
}

/** tus 1.0: create (POST), ask the offset (HEAD), append from it (PATCH) in parts. */
export class TusUpload extends ResumableUpload {
  constructor(file, endpoint, credentials) {
    super(file, credentials);
    this.endpoint = endpoint;
    this.protocol = "tus";
    const saved = savedUploads()[fingerprint(file)];
    this.url = saved && saved.protocol === "tus" ? saved.url : null;
    this.partSize = 4 * MiB;
  }

  async run(signal) {
    const tus = { "Tus-Resumable": "1.0.0" };
    let offset = this.url ? await this._offset(signal) : null;
    if (offset === null) {
      const created = expect(
        await this._request("POST", this.endpoint, {
          signal,
          headers: {
            ...tus,
            "Upload-Length": String(this.size),
            "Upload-Metadata": `filename ${base64(this.file.name)},filetype ${base64(this.file.type || "application/octet-stream")}`,
          },
        }),
        201,
      );
      this.url = new URL(created.header("Location"), location.href).href;
      save(this.file, { protocol: "tus", url: this.url });
      offset = 0;
    } else if (this.resumedFrom === null) {
      this.resumedFrom = offset;
    }
    this._progress(offset);
    while (offset < this.size) {
      const from = offset;
      const end = Math.min(offset + this.partSize, this.size);
      const started = performance.now();
      const response = await this._send(
        "PATCH",
        this.url,
        { ...tus, "Upload-Offset": String(offset), "Content-Type": "application/offset+octet-stream" },
        this.file.slice(offset, end),
        signal,
        (loaded) => this._progress(from, loaded),
      );
      if (response.status === 409) { // someone else moved it: ask again
        offset = await this._offset(signal);
        continue;
      }
      expect(response, 204);
      offset = Number(response.header("Upload-Offset"));
      this._progress(offset);
      // about two seconds per request: the console sees the offset move, requests stay few
      const seconds = (performance.now() - started) / 1000;
      const rate = (offset - from) / Math.max(seconds, 0.01);
      this.partSize = Math.min(64 * MiB, Math.max(MiB, Math.round(rate * 2)));
    }
    this.downloadUrl = this.url;
  }

  /** Where the server says the upload stands, or null if it is gone (start again). */
  async _offset(signal) {
    const response = await this._request("HEAD", this.url, { signal, headers: { "Tus-Resumable": "1.0.0" } });
    if (response.status === 404 || response.status === 410) {
      forget(this.file);
      this.url = null;
      return null;
    }
    expect(response, 200, 204);
    return Number(response.header("Upload-Offset"));
  }
}

/** The chunk API: a session, numbered chunks in parallel, the missing list on resume. */
export class ChunkUpload extends ResumableUpload {
  constructor(file, endpoint, credentials, sha256) {
    super(file, credentials);
    this.endpoint = endpoint;
    this.protocol = "chunks";
    this.sha256 = sha256;
    const saved = savedUploads()[fingerprint(file)];
    this.url = saved && saved.protocol === "chunks" ? saved.url : null;
  }

  async run(signal) {
    let session = this.url ? await this._status(signal) : null;
    if (session === null) {
      const spec = {
        size: this.size,
        chunk_size: Math.max(256 << 10, Math.ceil(this.size / 16 / 65536) * 65536),
        metadata: { filename: this.file.name, filetype: this.file.type || "application/octet-stream" },
      };
      if (this.sha256) spec.sha256 = this.sha256;
      const created = expect(
        await this._request("POST", this.endpoint, {
          signal,
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify(spec),
        }),
        201,
      );
      session = JSON.parse(created.text);
      this.url = session.url;
      save(this.file, { protocol: "chunks", url: this.url });
    } else if (this.resumedFrom === null) {
      this.resumedFrom = session.bytes_stored;
    }
    let stored = session.bytes_stored;
    this._progress(stored);
    const missing = session.missing.flatMap(([first, last]) =>
      Array.from({ length: last - first + 1 }, (_, i) => first + i),
    );
    const inFlight = new Map();
    const report = () => this._progress(stored, [...inFlight.values()].reduce((a, b) => a + b, 0));
    const worker = async () => {
      while (missing.length) {
        const n = missing.shift();
        const start = (n - 1) * session.chunk_size;
        const end = Math.min(start + session.chunk_size, this.size);
        inFlight.set(n, 0);
        try {
          const response = await this._send(
            "PUT",
            session.chunk_url_template.replace("{n}", n),
            {},
            this.file.slice(start, end),
            signal,
            (loaded) => { inFlight.set(n, loaded); report(); },
          );
          expect(response, 200, 201);
          stored += end - start;
        } finally {
          inFlight.delete(n);
        }
        report();
      }
    };
    await Promise.all(Array.from({ length: PARALLEL_CHUNKS }, worker));
    const done = expect(await this._request("POST", session.complete_url, { signal }), 200);
    this.downloadUrl = JSON.parse(done.text).upload_url;
    this._progress(this.size);
  }

  async _status(signal) {
    const response = await this._request("GET", this.url, { signal });
    if (response.status === 404 || response.status === 410) {
      forget(this.file);
      this.url = null;
      return null;
    }
    return JSON.parse(expect(response, 200).text);
  }
}

/** SHA-256 (hex) of a Blob or ArrayBuffer; null where SubtleCrypto is missing (plain http). */
export async function sha256(data) {
  if (!globalThis.crypto || !crypto.subtle) return null;
  const buffer = data instanceof Blob ? await data.arrayBuffer() : data;
  const digest = await crypto.subtle.digest("SHA-256", buffer);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}
