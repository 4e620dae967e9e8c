// The browser upload page: finds DICOM files in what the user drops or picks, and sends
// each one to POST /instances with the site's token, a few at a time.
//
// The token lives in this closure only: never in the URL, storage or cookies. The DOM is
// touched once per animation frame, and only for what is visible (files in flight,
// problems, a short recent list), so a study of thousands of files does not freeze the tab.
'use strict';

(() => {
  const CONCURRENCY = 4;
  const SCAN_CONCURRENCY = 8;
  const MAX_AUTO_RETRIES = 4;
  const BACKOFF_BASE_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  // A longer wait than this (e.g. a daily quota) stops the run instead of waiting silently.
  const MAX_AUTO_WAIT_MS = 120000;
  const RECENT_LIMIT = 20;
  const PROBLEM_ROWS_LIMIT = 500;
  const SKIPPED_NAMES_LIMIT = 20;
  // Answers worth trying again by themselves; other 4xx are the file's own fault.
  const TRANSIENT = new Set([0, 408, 429, 502, 503, 504, 507]);
  // PS3.10 §7.1: a 128-byte preamble, then "DICM".
  const DICM = [0x44, 0x49, 0x43, 0x4d];

  const $ = (id) => document.getElementById(id);
  const ui = {
    form: $('upload-form'),
    site: $('site'),
    token: $('token'),
    dropzone: $('dropzone'),
    pickFiles: $('pick-files'),
    pickFolder: $('pick-folder'),
    selection: $('selection'),
    skipped: $('skipped'),
    start: $('start'),
    stop: $('stop'),
    retry: $('retry'),
    alert: $('alert'),
    status: $('status'),
    overallFiles: $('overall-files'),
    overallBytes: $('overall-bytes'),
    filesText: $('files-text'),
    bytesText: $('bytes-text'),
    inFlight: $('in-flight'),
    inFlightEmpty: $('in-flight-empty'),
    problems: $('problems'),
    problemsBody: document.querySelector('#problems tbody'),
    problemsEmpty: $('problems-empty'),
    problemsMore: $('problems-more'),
    recent: $('recent'),
    counts: Object.fromEntries(
      Array.from(document.querySelectorAll('[data-count]'), (td) => [td.dataset.count, td]),
    ),
  };

  // Relative to this page, so a path prefix in front of the intake is kept:
  // /upload -> /instances, /intake/upload -> /intake/instances.
  const instancesUrl = new URL('instances', location.href).href;
  const systemUrl = new URL('system', location.href).href;

  // A FIFO that does not shift a large array for every file.
  class Queue {
    constructor() { this.items = []; this.head = 0; }
    get length() { return this.items.length - this.head; }
    push(item) { this.items.push(item); }
    unshift(item) {
      if (this.head > 0) { this.head -= 1; this.items[this.head] = item; } else { this.items.unshift(item); }
    }
    shift() {
      const item = this.items[this.head];
      this.items[this.head] = undefined;
      this.head += 1;
      if (this.head > 1024 && this.head * 2 > this.items.length) {
        this.items = this.items.slice(this.head);
        this.head = 0;
      }
      return item;
    }
  }

  const state = {
    authorization: null, // "Basic …", set once the intake accepted the site name and token
    running: false,
    checking: false,
    blocked: false, // the intake refused the credentials or asked for a long wait
    stopped: false,
    walking: 0, // dropped folders still being read
    scanQueue: new Queue(),
    scanning: 0,
    queue: new Queue(),
    active: new Set(),
    resumeAt: 0,
    resumeTimer: 0,
    nextId: 1,
    counts: { accepted: 0, duplicate: 0, quarantined: 0, rejected: 0, failed: 0, skipped: 0 },
    totalFiles: 0,
    totalBytes: 0,
    settledFiles: 0,
    settledBytes: 0,
    skippedNames: [],
    problems: [],
    problemsRendered: 0,
    problemsDirty: false,
    recent: [],
    recentDirty: false,
  };

  // ---- rendering, at most once per frame --------------------------------------------------

  let renderPending = false;

  function scheduleRender() {
    if (renderPending) return;
    renderPending = true;
    // Hidden tabs get no animation frames; the page still has to reach "done" there.
    if (document.hidden) setTimeout(render, 500); else requestAnimationFrame(render);
  }

  const number = (n) => n.toLocaleString('en');

  function formatBytes(n) {
    const units = ['B', 'kB', 'MB', 'GB', 'TB'];
    let value = n;
    let unit = 0;
    while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
    return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
  }

  function setText(element, text) {
    if (element.textContent !== text) element.textContent = text;
  }

  function render() {
    renderPending = false;
    const waiting = state.totalFiles - state.settledFiles;
    for (const [name, td] of Object.entries(ui.counts)) {
      setText(td, number(name === 'waiting' ? waiting : state.counts[name]));
    }

    let inFlightBytes = 0;
    for (const record of state.active) inFlightBytes += record.loaded;
    ui.overallFiles.max = Math.max(state.totalFiles, 1);
    ui.overallFiles.value = state.settledFiles;
    setText(ui.filesText, `${number(state.settledFiles)} of ${number(state.totalFiles)}`);
    ui.overallBytes.max = Math.max(state.totalBytes, 1);
    ui.overallBytes.value = Math.min(state.settledBytes + inFlightBytes, state.totalBytes);
    setText(ui.bytesText, `${formatBytes(state.settledBytes + inFlightBytes)} of ${formatBytes(state.totalBytes)}`);

    renderInFlight();
    renderProblems();
    renderRecent();
    renderSelection();
    renderStatus();

    ui.stop.disabled = !(state.running && (state.active.size > 0 || state.queue.length > 0));
    ui.retry.disabled = state.counts.failed === 0 || state.checking;
    ui.start.disabled = state.checking;
  }

  function renderInFlight() {
    for (const row of Array.from(ui.inFlight.children)) {
      if (!state.active.has(row.record)) {
        row.record.row = null;
        row.remove();
      }
    }
    for (const record of state.active) {
      if (!record.row) {
        const li = document.createElement('li');
        const label = document.createElement('label');
        const progress = document.createElement('progress');
        progress.id = `file-${record.id}`;
        label.htmlFor = progress.id;
        label.textContent = record.path;
        li.append(label, progress);
        li.record = record;
        record.row = li;
        record.progress = progress;
        ui.inFlight.append(li);
      }
      record.progress.max = Math.max(record.size, 1);
      record.progress.value = record.loaded;
    }
    ui.inFlightEmpty.hidden = state.active.size > 0;
  }

  function problemRow(record) {
    const tr = document.createElement('tr');
    const file = document.createElement('td');
    const outcome = document.createElement('td');
    const reason = document.createElement('td');
    file.textContent = record.path;
    outcome.textContent = record.outcome === 'rejected'
      ? `Rejected (HTTP ${record.httpStatus})`
      : 'Failed';
    reason.textContent = record.reason;
    reason.className = 'reason';
    tr.append(file, outcome, reason);
    return tr;
  }

  function renderProblems() {
    if (state.problemsDirty) {
      ui.problemsBody.replaceChildren();
      state.problemsRendered = 0;
      state.problemsDirty = false;
    }
    const upTo = Math.min(state.problems.length, PROBLEM_ROWS_LIMIT);
    if (state.problemsRendered < upTo) {
      const fragment = document.createDocumentFragment();
      for (let i = state.problemsRendered; i < upTo; i += 1) fragment.append(problemRow(state.problems[i]));
      ui.problemsBody.append(fragment);
      state.problemsRendered = upTo;
    }
    ui.problems.hidden = state.problems.length === 0;
    ui.problemsEmpty.hidden = state.problems.length > 0;
    const more = state.problems.length - upTo;
    ui.problemsMore.hidden = more <= 0;
    if (more > 0) setText(ui.problemsMore, `…and ${number(more)} more not shown.`);
  }

  function renderRecent() {
    if (!state.recentDirty) return;
    state.recentDirty = false;
    ui.recent.replaceChildren(...state.recent.map((record) => {
      const li = document.createElement('li');
      li.textContent = `${record.path}: ${OUTCOME_TEXT[record.outcome]}`;
      return li;
    }));
  }

  function renderSelection() {
    const found = state.totalFiles + state.counts.skipped;
    if (found === 0 && state.walking === 0 && state.scanning === 0) return;
    const busy = state.walking > 0 || state.scanning > 0 || state.scanQueue.length > 0;
    setText(
      ui.selection,
      `${number(state.totalFiles)} DICOM file${state.totalFiles === 1 ? '' : 's'} ` +
      `(${formatBytes(state.totalBytes)}) chosen${busy ? ', still looking…' : '.'}`,
    );
    const skipped = state.counts.skipped;
    ui.skipped.hidden = skipped === 0;
    if (skipped > 0) {
      const names = state.skippedNames.join(', ');
      const rest = skipped - state.skippedNames.length;
      setText(
        ui.skipped,
        `${number(skipped)} file${skipped === 1 ? ' was' : 's were'} left out ` +
        `(DICOMDIR or not DICOM): ${names}${rest > 0 ? ` and ${number(rest)} more` : ''}.`,
      );
    }
  }

  const OUTCOME_TEXT = {
    accepted: 'accepted',
    duplicate: 'already stored',
    quarantined: 'quarantined',
    rejected: 'rejected',
    failed: 'failed',
  };

  function finishedText() {
    const c = state.counts;
    const parts = [
      `${number(c.accepted)} accepted`,
      `${number(c.duplicate)} already stored`,
      `${number(c.quarantined)} quarantined`,
      `${number(c.rejected)} rejected`,
      `${number(c.failed)} failed`,
    ];
    if (c.skipped) parts.push(`${number(c.skipped)} left out`);
    return `Finished: ${parts.join(', ')}.`;
  }

  function currentStatus() {
    const busy = state.walking > 0 || state.scanning > 0 || state.scanQueue.length > 0;
    if (state.checking) return ['checking', 'Checking your site name and token…'];
    if (state.blocked) return ['blocked', 'Not sending: see the message above.'];
    if (!state.running) {
      if (state.stopped) return ['stopped', 'Stopped. Press Upload to continue.'];
      if (state.totalFiles > 0 || busy) return ['chosen', 'Files chosen. Press Upload to send them.'];
      return ['idle', ui.status.textContent];
    }
    if (state.active.size > 0 || state.queue.length > 0 || busy) {
      if (state.resumeAt > Date.now() && state.active.size === 0) {
        return ['waiting', 'The intake asked to wait a little; sending resumes by itself.'];
      }
      return ['sending', 'Sending files…'];
    }
    if (state.totalFiles === 0 && state.counts.skipped === 0) {
      return ['ready', 'Ready: choose or drop files to send them.'];
    }
    return ['done', finishedText()];
  }

  function renderStatus() {
    const [name, text] = currentStatus();
    // Only phase changes are written, so the live region does not chatter per file.
    if (ui.status.dataset.state !== name || (name === 'done' && ui.status.textContent !== text)) {
      ui.status.dataset.state = name;
      setText(ui.status, text);
    }
  }

  function showAlert(text) {
    ui.alert.hidden = false;
    ui.alert.textContent = '';
    // A fresh text node after clearing, so the same message is announced again.
    requestAnimationFrame(() => { ui.alert.textContent = text; });
  }

  function clearAlert() {
    ui.alert.hidden = true;
    ui.alert.textContent = '';
  }

  // ---- finding files ---------------------------------------------------------------------

  function addFile(file, path) {
    state.scanQueue.push({ file, path: path || file.name });
    pumpScan();
  }

  function skip(path) {
    state.counts.skipped += 1;
    if (state.skippedNames.length < SKIPPED_NAMES_LIMIT) state.skippedNames.push(path);
  }

  async function looksLikeDicom(file) {
    if (file.size < 8) return false;
    // 132 bytes, not the whole file: a study can be gigabytes.
    const bytes = new Uint8Array(await file.slice(0, 132).arrayBuffer());
    if (bytes.length >= 132 && DICM.every((byte, i) => bytes[128 + i] === byte)) return true;
    // A bare data set, as Orthanc takes one (docs/VALIDATION.md): it opens with group
    // 0002 or 0008, little endian, or 0008 big endian.
    const little = bytes[0] | (bytes[1] << 8);
    const big = (bytes[0] << 8) | bytes[1];
    return little === 0x0002 || little === 0x0008 || big === 0x0008;
  }

  async function scan({ file, path }) {
    // DICOMDIR is a media index (PS3.10 §8), not an instance to store.
    if (file.name.toUpperCase() === 'DICOMDIR') { skip(path); return; }
    let dicom = false;
    try {
      dicom = await looksLikeDicom(file);
    } catch {
      dicom = false; // unreadable (moved, no permission): left out like any non-DICOM file
    }
    if (!dicom) { skip(path); return; }
    state.queue.push({
      id: state.nextId++, file, path, size: file.size,
      outcome: null, loaded: 0, retries: 0, xhr: null, row: null, progress: null,
    });
    state.totalFiles += 1;
    state.totalBytes += file.size;
  }

  function pumpScan() {
    while (state.scanning < SCAN_CONCURRENCY && state.scanQueue.length > 0) {
      state.scanning += 1;
      scan(state.scanQueue.shift()).finally(() => {
        state.scanning -= 1;
        pumpScan();
        pumpUploads();
      });
    }
    scheduleRender();
  }

  const fileOf = (entry) => new Promise((resolve, reject) => entry.file(resolve, reject));
  const batchOf = (reader) => new Promise((resolve, reject) => reader.readEntries(resolve, reject));

  async function walk(entry) {
    const path = entry.fullPath.replace(/^\//, '');
    try {
      if (entry.isFile) {
        addFile(await fileOf(entry), path);
      } else if (entry.isDirectory) {
        const reader = entry.createReader();
        // readEntries answers in batches (about 100 in Chromium); empty means done.
        for (let batch = await batchOf(reader); batch.length > 0; batch = await batchOf(reader)) {
          for (const child of batch) await walk(child);
        }
      }
    } catch {
      skip(path);
      scheduleRender();
    }
  }

  async function addDropped(dataTransfer) {
    // Entries must be taken during the drop event; the DataTransfer is emptied after it.
    const entries = [];
    const plain = [];
    for (const item of Array.from(dataTransfer.items || [])) {
      if (item.kind !== 'file') continue;
      const entry = item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
      if (entry) entries.push(entry);
      else if (item.getAsFile()) plain.push(item.getAsFile());
    }
    if (entries.length === 0 && plain.length === 0) {
      plain.push(...Array.from(dataTransfer.files || []));
    }
    for (const file of plain) addFile(file, file.name);
    state.walking += 1;
    scheduleRender();
    try {
      for (const entry of entries) await walk(entry);
    } finally {
      state.walking -= 1;
      pumpUploads();
    }
  }

  function addPicked(input) {
    for (const file of Array.from(input.files)) addFile(file, file.webkitRelativePath || file.name);
    input.value = ''; // the same files can be chosen again
  }

  // ---- sending ---------------------------------------------------------------------------

  function basicAuthorization(site, token) {
    let binary = '';
    for (const byte of new TextEncoder().encode(`${site}:${token}`)) binary += String.fromCharCode(byte);
    return `Basic ${btoa(binary)}`;
  }

  function parseJson(text) {
    try {
      const value = JSON.parse(text);
      return value && typeof value === 'object' ? value : null;
    } catch {
      return null;
    }
  }

  // Orthanc's error shape: Details is the precise reason, Message the general one.
  function reasonOf(status, body) {
    if (body && (body.Details || body.Message)) return String(body.Details || body.Message);
    if (status === 0) return 'The connection failed: the intake could not be reached.';
    return `The intake answered HTTP ${status}.`;
  }

  function retryAfterMs(header) {
    if (!header) return null;
    const seconds = Number(header);
    if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
    const date = Date.parse(header);
    return Number.isNaN(date) ? null : Math.max(0, date - Date.now());
  }

  function backoffMs(retries) {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** retries);
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  function setOutcome(record, outcome) {
    if (record.outcome) {
      state.counts[record.outcome] -= 1;
      state.settledFiles -= 1;
      state.settledBytes -= record.size;
    }
    record.outcome = outcome;
    if (outcome) {
      state.counts[outcome] += 1;
      state.settledFiles += 1;
      state.settledBytes += record.size;
    }
  }

  function settle(record, outcome, httpStatus, reason) {
    setOutcome(record, outcome);
    record.httpStatus = httpStatus;
    record.reason = reason;
    if (outcome === 'rejected' || outcome === 'failed') {
      state.problems.push(record);
    } else {
      state.recent.unshift(record);
      if (state.recent.length > RECENT_LIMIT) state.recent.pop();
      state.recentDirty = true;
    }
  }

  function pauseFor(ms) {
    state.resumeAt = Math.max(state.resumeAt, Date.now() + ms);
    clearTimeout(state.resumeTimer);
    state.resumeTimer = setTimeout(() => { state.resumeAt = 0; pumpUploads(); }, state.resumeAt - Date.now());
  }

  function halt(message) {
    state.running = false;
    state.blocked = true;
    clearTimeout(state.resumeTimer);
    state.resumeAt = 0;
    showAlert(message);
  }

  function answered(record, status, body, retryAfter) {
    state.active.delete(record);
    record.xhr = null;
    record.loaded = 0;
    if (status === 200 && body && body.Status) {
      let outcome = 'accepted';
      if (body.IntakeState === 'quarantined') outcome = 'quarantined';
      else if (body.IntakeState === 'duplicate' || body.Status === 'AlreadyStored') outcome = 'duplicate';
      settle(record, outcome, status, '');
    } else if (status === 401) {
      // Revoked or expired while sending: every other file would fail the same way.
      state.queue.unshift(record);
      if (!state.blocked) {
        halt(`The intake no longer accepts this site name and token (HTTP 401): ${reasonOf(status, body)}`);
      }
    } else if (TRANSIENT.has(status)) {
      const wait = retryAfterMs(retryAfter) ?? backoffMs(record.retries);
      if (wait > MAX_AUTO_WAIT_MS) {
        state.queue.unshift(record);
        if (!state.blocked) {
          halt(
            `The intake asks to wait about ${Math.ceil(wait / 60000)} minutes before more files ` +
            `are sent (HTTP ${status}): ${reasonOf(status, body)} Press Upload to try again later.`,
          );
        }
      } else if (record.retries < MAX_AUTO_RETRIES) {
        record.retries += 1;
        state.queue.unshift(record);
        pauseFor(wait);
      } else {
        settle(record, 'failed', status, reasonOf(status, body));
      }
    } else if (status >= 400 && status < 500) {
      settle(record, 'rejected', status, reasonOf(status, body));
    } else {
      settle(record, 'failed', status, reasonOf(status, body));
    }
    pumpUploads();
  }

  function send(record) {
    const xhr = new XMLHttpRequest();
    record.xhr = xhr;
    record.loaded = 0;
    state.active.add(record);
    xhr.open('POST', instancesUrl);
    xhr.setRequestHeader('Authorization', state.authorization);
    xhr.setRequestHeader('Content-Type', 'application/dicom');
    xhr.upload.addEventListener('progress', (event) => {
      record.loaded = event.loaded;
      scheduleRender();
    });
    xhr.addEventListener('load', () => {
      answered(record, xhr.status, parseJson(xhr.responseText), xhr.getResponseHeader('Retry-After'));
    });
    xhr.addEventListener('error', () => answered(record, 0, null, null));
    xhr.addEventListener('timeout', () => answered(record, 0, null, null));
    xhr.addEventListener('abort', () => {
      // Stopped by the user: the file waits for the next Upload.
      state.active.delete(record);
      record.xhr = null;
      record.loaded = 0;
      state.queue.unshift(record);
      scheduleRender();
    });
    xhr.send(record.file); // the browser streams the file; it is never read into memory here
  }

  function pumpUploads() {
    while (
      state.running && state.resumeAt <= Date.now()
      && state.active.size < CONCURRENCY && state.queue.length > 0
    ) {
      send(state.queue.shift());
    }
    scheduleRender();
  }

  async function start() {
    clearAlert();
    const site = ui.site.value.trim();
    const token = ui.token.value.trim();
    if (!site || !token) {
      showAlert('Enter the site name and the token your administrator gave you.');
      (site ? ui.token : ui.site).focus();
      return;
    }
    const authorization = basicAuthorization(site, token);
    state.checking = true;
    state.blocked = false;
    state.stopped = false;
    scheduleRender();
    let response = null;
    let body = null;
    try {
      // fetch with credentials "omit" never opens the browser's own login dialog on a 401.
      response = await fetch(systemUrl, {
        headers: { Authorization: authorization },
        credentials: 'omit',
        cache: 'no-store',
        referrerPolicy: 'no-referrer',
      });
      body = parseJson(await response.text());
    } catch {
      response = null;
    }
    state.checking = false;
    if (response === null) {
      halt('The intake could not be reached. Check your connection and press Upload again.');
    } else if (response.status === 401) {
      halt(`The site name or token was not accepted (HTTP 401): ${reasonOf(401, body)}`);
    } else if (!response.ok) {
      const wait = retryAfterMs(response.headers.get('Retry-After'));
      const later = wait ? ` Try again in about ${Math.max(1, Math.ceil(wait / 60000))} minute(s).` : '';
      halt(`The intake refused to start (HTTP ${response.status}): ${reasonOf(response.status, body)}${later}`);
    } else {
      state.authorization = authorization;
      state.running = true;
      pumpUploads();
    }
    scheduleRender();
  }

  function stop() {
    state.running = false;
    state.stopped = true;
    clearTimeout(state.resumeTimer);
    state.resumeAt = 0;
    for (const record of Array.from(state.active)) record.xhr.abort();
    scheduleRender();
  }

  function retryFailed() {
    const failed = state.problems.filter((record) => record.outcome === 'failed');
    state.problems = state.problems.filter((record) => record.outcome !== 'failed');
    state.problemsDirty = true;
    for (const record of failed) {
      setOutcome(record, null);
      record.retries = 0;
      state.queue.push(record);
    }
    if (state.running) pumpUploads(); else start();
  }

  // ---- wiring ----------------------------------------------------------------------------

  ui.form.addEventListener('submit', (event) => {
    event.preventDefault(); // never a form post: the token must not leave in a URL or body
    start();
  });
  ui.stop.addEventListener('click', stop);
  ui.retry.addEventListener('click', retryFailed);
  ui.pickFiles.addEventListener('change', () => addPicked(ui.pickFiles));
  ui.pickFolder.addEventListener('change', () => addPicked(ui.pickFolder));

  ui.dropzone.addEventListener('click', () => ui.pickFiles.click());
  ui.dropzone.addEventListener('keydown', (event) => {
    if (event.key === 'Enter') {
      event.preventDefault();
      ui.pickFiles.click();
    } else if (event.key === ' ') {
      event.preventDefault(); // no page scroll; a button acts on Space when it is released
    }
  });
  ui.dropzone.addEventListener('keyup', (event) => {
    if (event.key === ' ') ui.pickFiles.click();
  });
  ui.dropzone.addEventListener('dragenter', (event) => {
    event.preventDefault();
    ui.dropzone.classList.add('over');
  });
  ui.dropzone.addEventListener('dragover', (event) => {
    event.preventDefault();
    event.dataTransfer.dropEffect = 'copy';
  });
  ui.dropzone.addEventListener('dragleave', (event) => {
    if (!ui.dropzone.contains(event.relatedTarget)) ui.dropzone.classList.remove('over');
  });
  ui.dropzone.addEventListener('drop', (event) => {
    event.preventDefault();
    ui.dropzone.classList.remove('over');
    addDropped(event.dataTransfer);
  });
  // A file dropped beside the zone must not replace the page (and its token) with itself.
  for (const type of ['dragover', 'drop']) {
    window.addEventListener(type, (event) => {
      const files = Array.from(event.dataTransfer?.types || []).includes('Files');
      if (files && !ui.dropzone.contains(event.target)) event.preventDefault();
    });
  }
  window.addEventListener('beforeunload', (event) => {
    if (state.running && (state.active.size > 0 || state.queue.length > 0)) event.preventDefault();
  });
})();
