// The page of `edgexfer device serve` (index.html): plain JavaScript, no build step, no inline handler
// (addEventListener only, so a Content-Security-Policy of script-src 'self' holds). Every value shown
// comes from the JSON API (runtime/service/routes_*.py).
"use strict";
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "edgexfer.token";
const ROLLBACK_CONFIRM_MS = 8000;  // how long "Really roll back …?" waits for its second click
let classes = [];          // the active head's classes (status.head.classes)
let choices = [];          // the labels offered: the head's classes, then classes learned since (samples per class)
let headVersion = null;    // the head the status shows
let previousHead = null;   // the head a rollback goes back to (status.head.previous)
let reviewSignature = "";  // ids shown in the review queue, to redraw only when they change
let modality = "";         // the active bundle's modality (its name: the form is redrawn when it changes)
let shownAs = "image";     // how its samples are drawn: "image" (a thumbnail), "text" or "audio" (a player)
                           // (/v1/status bundle.form)
let recordSeconds = null;  // seconds one recording lasts (bundle.form.record_s); null: samples are not recorded
let reviewUrls = [];       // the blob: URLs of the review queue's audio players, released when it is redrawn
let retrainJob = null;     // the retrain job whose report is shown
let polling = false;       // a retrain is being polled
let answer = null;         // the answer shown: {sample: Blob, name, reviewId, learned: null | text}
let rollbackArmed = null;  // the timer of an armed rollback (first click done)
const calls = {};          // refreshes started, by name: an answer that a newer call overtook is dropped

// starts a refresh; the function returned says whether a newer one started since
function begin(name) {
  const mine = calls[name] = (calls[name] || 0) + 1;
  return () => calls[name] !== mine;
}

// ------------------------------------------------------------------ the API and its errors
async function api(method, path, body) {
  const headers = {};
  if (body !== undefined && !(body instanceof Blob) && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  Object.assign(headers, tokenHeader());
  let resp;
  try {
    resp = await fetch(path, { method, headers, body, cache: "no-store" });
  } catch (exc) {
    throw new Error(`${method} ${path}: no answer from the device (${exc.message})`);
  }
  const text = await resp.text();
  let data = null;
  try { data = JSON.parse(text); } catch (_) { /* reported below when it matters */ }
  if (!resp.ok) {
    const why = data && typeof data.error === "string" ? data.error : text.slice(0, 300);
    const err = new Error(`${method} ${path} → ${resp.status}: ${why}`);
    err.status = resp.status;
    throw err;
  }
  if (data === null) throw new Error(`${method} ${path}: the answer is not JSON`);
  return data;
}

// the token, when one is saved: changes need it, and beyond loopback so does reading the field data
function tokenHeader() {
  const token = localStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

function showError(exc) {
  $("error-text").textContent = `${new Date().toLocaleTimeString()}  ${exc.message || exc}`;
  $("error").hidden = false;
}
$("error-close").addEventListener("click", () => { $("error").hidden = true; $("error-text").textContent = ""; });

// runs an action, showing what went wrong
function guarded(fn) {
  return async (...args) => { try { await fn(...args); } catch (exc) { showError(exc); } };
}

function text(id, value) { $(id).textContent = value === null || value === undefined ? "–" : String(value); }
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  for (const c of children) node.append(c);
  return node;
}
const pct = (p) => (p === null || p === undefined) ? "–" : (100 * p).toFixed(1) + " %";
const ms = (v) => (v === null || v === undefined) ? "–" : v.toFixed(1) + " ms";
const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

// ------------------------------------------------------------------ status
// the service's last drift test (/v1/status drift.last): a banner while it says the inputs changed
function drawDrift(d) {
  const last = d && d.last;
  $("drift").hidden = !(last && last.drift === true);
  if (!last || last.drift !== true) return;
  const conf = last.confidence || {};
  const pct = (x) => (x === null || x === undefined ? "?" : `${Math.round(x * 100)} %`);
  text("drift-text", `The latest ${last.window} inputs differ from the training samples (p = ${last.p_value}, ` +
       `alpha ${last.alpha}); confidence ${pct(conf.window)} against ${pct(conf.reference)} in training. ` +
       "Label some of them below and retrain, or check the camera.");
}

async function refreshStatus() {
  const overtaken = begin("status");
  const s = await api("GET", "/v1/status");
  if (overtaken()) return s;
  classes = s.head.classes;
  const counts = Object.entries(s.cache.samples_per_class);
  // a class learned on the device is offered at once, before a retrain puts it in the head
  const learned = counts.map(([c]) => c).filter((c) => !classes.includes(c)).sort();
  const offered = [...classes, ...learned];
  const choicesChanged = offered.join("\n") !== choices.join("\n");
  choices = offered;
  if (s.bundle.modality && s.bundle.modality !== modality) {
    modality = s.bundle.modality;
    const form = s.bundle.form;  // the modality says how it is asked for and shown
    shownAs = form.shown_as;
    text("classify-title", form.title);
    $("text-form").hidden = !form.literal;
    $("upload").accept = form.accept;
    recordSeconds = form.record_s === undefined ? null : form.record_s;
    $("record").hidden = !(recordSeconds && canRecord());  // where the browser offers a microphone
    reviewSignature = "";  // review entries are drawn as texts, images or audio players
  }
  text("bundle-name", s.bundle.name);
  text("status-bundle", s.bundle.name);
  text("arch", s.bundle.arch);
  text("head-version", s.head.version);
  text("status-head", s.head.version);
  text("head-kind", s.head.kind);
  text("classes", s.head.classes.join(", "));
  text("backend", s.backend);
  text("precision", s.precision);
  text("inference-precision", s.execution && s.execution.inference_precision);
  text("latency-p50", ms(s.latency.p50_ms));
  text("latency-p99", ms(s.latency.p99_ms));
  text("samples", counts.length ? counts.map(([c, n]) => `${c} ${n}`).join(" · ") : "none learned yet");
  text("review-count", s.review_queue);
  $("token-box").hidden = !s.token_required;
  drawDrift(s.drift);
  $("connection").textContent = `up ${Math.round(s.uptime_s)} s`;
  const previous = s.head.previous === undefined ? null : s.head.previous;
  if (previous !== previousHead) {
    previousHead = previous;
    disarmRollback();  // a confirmation names the head it goes back to: not another one
  } else {
    drawRollback();
  }
  if (choicesChanged) drawAnswerLabels();
  if (s.head.version !== headVersion) {
    headVersion = s.head.version;
    await refreshHeads();
    await refreshReview();  // the class buttons follow the head's classes
  }
  if (s.retrain) showRetrain(s.retrain);
  return s;
}

// one button per label offered; a class the head does not know yet is marked (dashed)
function labelButtons(title, onPick) {
  return choices.map((c) => {
    const b = el("button", { className: classes.includes(c) ? "label-btn" : "label-btn new-label", textContent: c,
                             title: classes.includes(c) ? `${title} ${c}` : `${title} ${c} (learned, in the head after a retrain)` });
    b.dataset.label = c;
    b.addEventListener("click", () => onPick(c));
    return b;
  });
}

// ------------------------------------------------------------------ classify
$("upload").addEventListener("change", guarded(async () => {
  const file = $("upload").files[0];
  if (!file) return;
  await classify(file, file.name);
}));

// an uploaded file or a recording (a Blob): the device's answer, then the answer card with the sample
async function classify(sample, name) {
  $("answer").hidden = true;  // no earlier answer next to this sample, should this one fail
  answer = null;
  const r = await api("POST", "/v1/predict", sample);
  const media = [$("answer-image"), $("answer-audio")];
  for (const m of media) if (m.src) URL.revokeObjectURL(m.src);
  if (shownAs === "text") {
    await showAnswer(r, await sample.text(), sample, name);
  } else {
    media[shownAs === "audio" ? 1 : 0].src = URL.createObjectURL(sample);  // a player, or the image
    await showAnswer(r, null, sample, name);
  }
}

$("text-submit").addEventListener("click", guarded(async () => {
  const value = $("text-input").value;
  if (!value.trim()) return showError(new Error("type a text first"));
  $("answer").hidden = true;
  answer = null;
  const sample = new Blob([value], { type: "text/plain;charset=utf-8" });
  const r = await api("POST", "/v1/predict", sample);
  await showAnswer(r, value, sample, "text.txt");
}));

// the answer card: the image or audio player (already set) or the text, the label, the top-k bars, the label buttons
async function showAnswer(r, shownText, sample, name) {
  const top = r.results[0];
  answer = { sample, name, reviewId: r.review_id, learned: null };
  $("answer-image").hidden = shownText !== null || shownAs === "audio";
  $("answer-audio").hidden = shownText !== null || shownAs !== "audio";
  $("answer").classList.toggle("audio", shownText === null && shownAs === "audio");  // the player above
  $("answer-text").hidden = shownText === null;
  if (shownText !== null) $("answer-text").textContent = shownText;
  text("answer-label", top.label);
  text("answer-prob", pct(top.probability));
  text("answer-head", r.head);
  text("answer-queued", r.review_id === null ? "" : ` · queued for review as #${r.review_id}`);
  $("answer-topk").replaceChildren(...top.top_k.map((t) => {
    const fill = el("span");
    fill.style.width = `${(100 * t.probability).toFixed(1)}%`;  // CSSOM, not a style attribute: CSP allows it
    return el("li", {}, el("span", { textContent: t.label }), el("div", { className: "bar" }, fill),
      el("span", { className: "num", textContent: pct(t.probability) }));
  }));
  $("answer-new-class").value = "";
  drawAnswerLabels();
  $("answer").hidden = false;
  if (r.review_id !== null) await refreshReview();
}

function drawAnswerLabels() {
  if (!answer) return;
  const done = answer.learned !== null;
  const buttons = labelButtons("learn it as", (c) => labelAnswer(c));
  for (const b of buttons) b.disabled = done;
  $("answer-buttons").replaceChildren(...buttons);
  $("answer-new-class").disabled = done;
  $("answer-new-class-btn").disabled = done;
  text("answer-learned", done ? answer.learned : "");
}

$("answer-new-class-btn").addEventListener("click", () => {
  const name = $("answer-new-class").value.trim();
  if (!name) return showError(new Error("type a class name first"));
  labelAnswer(name);
});

// any answer can be labelled: a queued one by its review id (it leaves the queue), any other with its sample
const labelAnswer = guarded(async (name) => {
  const mine = answer;
  if (!mine || mine.learned !== null) return;
  const controls = [...document.querySelectorAll("#answer-labelling button, #answer-labelling input")];
  for (const c of controls) c.disabled = true;
  let report = null;
  try {
    if (mine.reviewId !== null) {
      try {
        report = await api("POST", "/v1/label", { id: mine.reviewId, label: name });
      } catch (exc) {
        if (exc.status !== 404) throw exc;  // gone from the queue (labelled there, or dropped): send the sample
      }
    }
    if (report === null) {
      const form = new FormData();
      form.append("label", name);
      form.append("file", mine.sample, mine.name);
      report = await api("POST", "/v1/label", form);
    }
    mine.learned = learnedText(name, report);
  } finally {
    if (answer === mine) drawAnswerLabels();
  }
  await refreshStatus();
  await refreshReview();
});

function learnedText(name, report) {
  if (report.added) return `learned as ${name}`;
  if (report.already_known) return `learned as ${name} (the device had this sample already)`;
  if (report.dropped) return `not kept: ${name} is full (${report.capacity} samples per class)`;
  return `sent as ${name}`;
}

// ------------------------------------------------------------------ review queue
async function refreshReview() {
  const overtaken = begin("review");
  const r = await api("GET", "/v1/review");
  // redrawn only when the entries or the labels offered changed, not under the user's pointer every 2 s
  const signature = r.entries.map((e) => e.id).join(",") + "|" + choices.join(",");
  if (overtaken() || signature === reviewSignature) return;
  reviewSignature = signature;
  for (const url of reviewUrls) URL.revokeObjectURL(url);  // the players drawn before are replaced
  reviewUrls = [];
  $("review-note").textContent = `${r.entries.length} below ${pct(r.threshold)}`;
  if (!r.entries.length) {
    $("review").replaceChildren(el("p", { className: "muted", textContent: "Nothing to review." }));
    return;
  }
  $("review").replaceChildren(...r.entries.map(reviewItem));
}

function reviewItem(e) {
  const item = el("div", { className: "review-item" });
  item.dataset.id = e.id;
  const buttons = labelButtons(`label #${e.id} as`, (c) => label(e.id, c));
  const input = el("input", { type: "text", className: "new-class", placeholder: "new class" });
  const add = el("button", { className: "new-class-btn", textContent: "add" });
  add.addEventListener("click", () => {
    const name = input.value.trim();
    if (!name) return showError(new Error("type a class name first"));
    label(e.id, name);
  });
  const thumb = shownAs === "text" ? el("pre", { className: "text-thumb", textContent: "…" })
    : shownAs === "audio" ? el("audio", { className: "thumb-audio", controls: true, preload: "metadata" })
      : el("img", { className: "thumb", alt: `review #${e.id}` });
  // fetched with the token (an <img src> cannot send it); a text as textContent, never HTML
  fetch(`/v1/review/${e.id}/image`, { cache: "no-store", headers: tokenHeader() })
    .then((resp) => resp.ok ? (shownAs === "text" ? resp.text() : resp.blob()) : Promise.reject())
    .then((got) => {
      if (shownAs === "text") { thumb.textContent = got; return; }
      if (shownAs === "audio") {  // played again and again: its URL lives until the queue is redrawn
        thumb.src = URL.createObjectURL(got);
        reviewUrls.push(thumb.src);
        return;
      }
      thumb.addEventListener("load", () => URL.revokeObjectURL(thumb.src), { once: true });
      thumb.src = URL.createObjectURL(got);
    }, () => { if (shownAs === "text") thumb.textContent = "(not readable)"; });
  item.append(
    thumb,
    el("div", { className: "meta" },
      el("b", { textContent: `#${e.id} ${e.label}` }),
      ` ${pct(e.probability)} · head ${e.head}`,
      el("br"), el("span", { className: "muted", textContent: e.created_utc })),
    el("div", { className: "buttons" }, ...buttons),
    el("div", { className: "new" }, input, add));
  return item;
}

const label = guarded(async (id, name) => {
  const buttons = [...document.querySelectorAll(`.review-item[data-id="${id}"] button`)];
  for (const b of buttons) b.disabled = true;
  let report;
  try {
    report = await api("POST", "/v1/label", { id, label: name });
  } catch (exc) {
    for (const b of buttons) b.disabled = false;  // still queued: the user may pick another label
    throw exc;
  }
  if (answer && answer.reviewId === id && answer.learned === null) {  // the answer shown is this entry
    answer.learned = learnedText(name, report);
    drawAnswerLabels();
  }
  await refreshStatus();
  await refreshReview();
});

// ------------------------------------------------------------------ record (a modality whose form has record_s)
// Record (microphone.js): one clip of the bundle's length, classified like an upload (and labelled from the answer card)
$("record").addEventListener("click", guarded(async () => {
  if (!recordSeconds) return;
  $("record").disabled = true;
  text("record-state", `recording ${recordSeconds} s…`);
  try {
    const { samples, rate } = await recordMicrophone(recordSeconds);
    text("record-state", "");
    $("upload").value = "";  // the answer is the recording's, not the file chosen before
    await classify(wavFile(samples, rate), "recording.wav");
  } finally {
    $("record").disabled = false;
    text("record-state", "");
  }
}));

// ------------------------------------------------------------------ retrain
$("retrain").addEventListener("click", guarded(async () => {
  $("retrain").disabled = true;
  try {
    showRetrain(await api("POST", "/v1/retrain", {}));
  } finally {
    if (!polling) $("retrain").disabled = false;
  }
}));

// The one evaluation that decided the gate (runtime/holdout.py retrain_gate), in one sentence: the
// accuracies are over the holdout, the leave-one-out samples, or both, and the count is theirs.
// ``j``: {gate, holdout, loo, accNew, accOld, tolerance, trained} from a retrain report or a head's metrics.
function judgedSentence(j) {
  if (j.gate === "none" || j.gate === undefined) {
    const on = j.trained === undefined ? "" : ` (${plural(j.trained, "sample", "samples")})`;
    return `not tested: no held-out sample and no few-shot sample to judge it on; accepted on its training data${on}`;
  }
  const what = {
    "holdout": `the holdout of ${plural(j.holdout, "sample", "samples")}`,
    "leave-one-out": `leave-one-out on ${plural(j.loo, "few-shot sample", "few-shot samples")}`,
    "holdout+leave-one-out": `${j.holdout + j.loo} samples (${j.holdout} held out + ${j.loo} by leave-one-out)`,
  }[j.gate] || `${j.gate} on ${plural(j.holdout + j.loo, "sample", "samples")}`;
  const allowed = j.tolerance === undefined ? "" : ` (allowed loss ${pct(j.tolerance)})`;
  return `judged by ${what}: the new head ${pct(j.accNew)} right, the old one ${pct(j.accOld)}${allowed}`;
}

function showRetrain(r) {
  if (r.state === "running") {
    text("retrain-state", `running (job ${r.job})…`);
    $("retrain").disabled = true;
    if (!polling) pollRetrain();
    return;
  }
  if (r.state === "idle" || r.job === retrainJob) return;
  retrainJob = r.job;
  $("retrain").disabled = false;
  if (r.state === "failed") {
    text("retrain-state", `job ${r.job} failed`);
    $("retrain-report").hidden = true;
    showError(new Error(`retrain failed: ${r.error}`));
    return;
  }
  const rep = r.report;
  text("retrain-state", `job ${r.job} done`);
  $("report-accepted").textContent = rep.accepted ? "yes" : "no";
  $("report-accepted").className = rep.accepted ? "yes" : "no";
  text("report-version", rep.version);
  text("report-judged", judgedSentence({
    gate: rep.gate, holdout: rep.holdout_count, loo: rep.loo_count, accNew: rep.holdout_accuracy_new,
    accOld: rep.holdout_accuracy_old, tolerance: rep.tolerance, trained: rep.train_count }));
  $("report-judged").title = rep.reason;  // the gate's own words, on hover
  text("report-seconds", rep.seconds);
  $("retrain-report").hidden = false;
}

async function pollRetrain() {
  polling = true;
  try {
    for (;;) {
      const r = await api("GET", "/v1/retrain");
      if (r.state !== "running") {
        showRetrain(r);
        await refreshStatus();
        await refreshHeads();
        return;
      }
      await new Promise((ok) => setTimeout(ok, 500));
    }
  } catch (exc) {
    showError(exc);
    $("retrain").disabled = false;
  } finally {
    polling = false;
  }
}

// ------------------------------------------------------------------ heads
// a head's figures as the history shows them: a retrained head's gate as its retrain report said it
const GATE_METRICS = ["gate", "holdout_accuracy", "holdout_accuracy_previous", "holdout_count", "loo_count"];
function headFigures(m) {
  const rest = Object.entries(m).filter(([k, v]) => (typeof v === "number" || typeof v === "boolean")
    && !(m.gate !== undefined && GATE_METRICS.includes(k)))
    .map(([k, v]) => `${k} ${typeof v === "number" && !Number.isInteger(v) ? v.toFixed(4) : v}`);
  if (m.gate === undefined) return rest.join(", ");
  const judged = judgedSentence({ gate: m.gate, holdout: m.holdout_count || 0, loo: m.loo_count || 0,
    accNew: m.holdout_accuracy, accOld: m.holdout_accuracy_previous, trained: m.train_count });
  return [judged, ...rest].join("; ");
}

async function refreshHeads() {
  const overtaken = begin("heads");
  const r = await api("GET", "/v1/heads");
  if (overtaken()) return;
  const rows = [...r.heads].reverse().map((h) => {
    // the figures; digests and other long strings only on hover
    const all = Object.entries(h.metrics || {});
    const version = el("td", { className: "nowrap" }, String(h.version));
    if (h.active) version.append(" ", el("span", { className: "badge", textContent: "active" }));
    const classesCell = el("td", { textContent: `${h.classes.length}`, title: h.classes.join(", ") });
    const row = el("tr", {}, version, el("td", { textContent: h.status }), el("td", { textContent: h.source }),
      el("td", { textContent: h.kind }), classesCell, el("td", { className: "nowrap", textContent: h.created_utc }),
      el("td", { textContent: headFigures(h.metrics || {}) || "–", title: all.map(([k, v]) => `${k}: ${v}`).join("\n") }));
    row.dataset.version = h.version;
    if (h.active) row.className = "active";
    return row;
  });
  $("heads").tBodies[0].replaceChildren(...rows);
}

// ------------------------------------------------------------------ rollback, confirmed by a second click
function drawRollback() {
  const button = $("rollback");
  button.disabled = previousHead === null;
  button.classList.toggle("danger", rollbackArmed !== null);
  $("rollback-cancel").hidden = rollbackArmed === null;
  if (previousHead === null) button.textContent = "Nothing to roll back to";
  else if (rollbackArmed !== null) button.textContent = `Really roll back to head ${previousHead}?`;
  else button.textContent = `Roll back to head ${previousHead}`;
}

function disarmRollback() {
  if (rollbackArmed !== null) clearTimeout(rollbackArmed);
  rollbackArmed = null;
  drawRollback();
}

$("rollback-cancel").addEventListener("click", disarmRollback);
$("rollback").addEventListener("click", guarded(async () => {
  if (previousHead === null) return;
  if (rollbackArmed === null) {  // the first click only asks
    rollbackArmed = setTimeout(disarmRollback, ROLLBACK_CONFIRM_MS);
    drawRollback();
    return;
  }
  disarmRollback();
  $("rollback").disabled = true;
  try {
    await api("POST", "/v1/rollback", {});
  } finally {
    await refreshStatus();
    await refreshHeads();
    drawRollback();
  }
}));

// ------------------------------------------------------------------ token
$("token").value = localStorage.getItem(TOKEN_KEY) || "";
$("token-save").addEventListener("click", () => {
  const t = $("token").value.trim();
  if (t) localStorage.setItem(TOKEN_KEY, t); else localStorage.removeItem(TOKEN_KEY);
});

// ------------------------------------------------------------------ start, then every 2 s
let ticking = false;  // one refresh at a time, however slow the device answers
async function tick() {
  if (ticking) return;
  ticking = true;
  try {
    await refreshStatus();
    await refreshReview();
  } catch (exc) {
    $("connection").textContent = exc.status === 401 ? "needs the token" : "no answer";
    if (exc.status === 401) $("token-box").hidden = false;  // beyond loopback even reading needs it
    showError(exc);
  } finally {
    ticking = false;
  }
}
tick();
setInterval(tick, 2000);
