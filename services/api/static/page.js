// deer-reid page: every change goes through the JSON API with the signed-in cookie.
"use strict";

function say(text, bad) {
  const box = document.getElementById("message");
  box.textContent = text;
  box.className = bad ? "error" : "ok";
}

async function send(method, url, body) {
  const response = await fetch(url, {
    method, credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-Deer-Page": "1"},
    body: JSON.stringify(body || {}),
  });
  let data = null;
  try { data = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    const detail = data && data.detail;
    const text = (detail && (detail.error || (Array.isArray(detail) ? detail.map(d => d.msg).join("; ") : detail))) ||
      response.statusText;
    if (response.status === 401) {
      say("Sign in to make changes (" + text + ").", true);
      setTimeout(() => { location.href = "/ui/login?next=" + encodeURIComponent(location.pathname); }, 1200);
    } else {
      say(text, true);
    }
    throw new Error(text);
  }
  if (data && data.audit_id) sessionStorage.setItem("deer-last-change", data.audit_id);
  return data;
}

function after(then) {
  const review = document.getElementById("review");
  if (then === "next" && review) {
    // the decided detection has left the queue: the same position now holds the next one
    location.href = location.pathname + location.search;
  } else {
    location.reload();
  }
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-post]");
  if (!button) return;
  event.preventDefault();
  if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
  button.disabled = true;
  try {
    const data = await send("POST", button.dataset.post, JSON.parse(button.dataset.body || "{}"));
    say("Done (change #" + data.audit_id + ").");
    after(button.dataset.then);
  } catch (e) {
    button.disabled = false;
  }
});

function candidates() { return Array.from(document.querySelectorAll(".candidate")); }

function select(index) {
  const all = candidates();
  if (!all.length) return;
  const i = Math.max(0, Math.min(all.length - 1, index));
  all.forEach((c, k) => c.classList.toggle("selected", k === i));
  all[i].scrollIntoView({block: "nearest"});
}

function selected() { return candidates().findIndex(c => c.classList.contains("selected")); }

function confirmSelected() {
  const all = candidates();
  const i = selected();
  if (i >= 0) all[i].querySelector("button.confirm").click();
}

function wire(id, handler, eventName) {
  const el = document.getElementById(id);
  if (el) el.addEventListener(eventName || "click", handler);
  return el;
}

wire("confirm-selected", (e) => { e.preventDefault(); confirmSelected(); });

wire("assign-form", async (e) => {
  e.preventDefault();
  const review = document.getElementById("review");
  const id = parseInt(document.getElementById("assign-id").value, 10);
  if (!id) { say("Type an individual's number.", true); return; }
  await send("POST", "/v1/detections/" + review.dataset.detection + "/decision", {action: "assign", individual_id: id});
  after("next");
}, "submit");

wire("reassign-form", async (e) => {
  e.preventDefault();
  const id = parseInt(document.getElementById("reassign-id").value, 10);
  if (!id) { say("Type an individual's number.", true); return; }
  await send("POST", e.target.dataset.url, {action: "assign", individual_id: id});
  after();
}, "submit");

wire("merge-form", async (e) => {
  e.preventDefault();
  const absorb = parseInt(document.getElementById("merge-id").value, 10);
  if (!absorb) { say("Type the number of the individual to merge in.", true); return; }
  const data = await send("POST", "/v1/individuals/merge", {keep: parseInt(e.target.dataset.keep, 10), absorb});
  say("Merged (change #" + data.audit_id + ").");
  after();
}, "submit");

wire("split-form", async (e) => {
  e.preventDefault();
  const chosen = Array.from(e.target.querySelectorAll("input[name=detection]:checked")).map(c => c.value);
  if (!chosen.length) { say("Tick the sightings that are another deer.", true); return; }
  const data = await send("POST", e.target.dataset.url, {detections: chosen});
  location.href = "/ui/individuals/" + data.after.founded;
}, "submit");

wire("edit-form", async (e) => {
  e.preventDefault();
  const f = e.target;
  const name = f.name.value.trim();
  const tags = f.tags.value.split(",").map(t => t.trim()).filter(Boolean);
  await send("PATCH", f.dataset.url, {name: name || null, tags, notes: f.notes.value});
  after();
}, "submit");

const loginKey = document.getElementById("login-key");
if (loginKey && location.hash.startsWith("#key=")) {
  // `deer-reid page` hands the local key over in the fragment, which never reaches a server log
  loginKey.value = decodeURIComponent(location.hash.slice(5));
  history.replaceState(null, "", location.pathname + location.search);
  document.getElementById("login-form").submit();
}

document.addEventListener("keydown", async (event) => {
  if (!document.getElementById("review") && event.key.toLowerCase() !== "u") return;
  if (event.target.closest("input, textarea, select") || event.metaKey || event.ctrlKey || event.altKey) return;
  const key = event.key.toLowerCase();
  if (/^[1-9]$/.test(key)) { select(parseInt(key, 10) - 1); }
  else if (key === "j" || key === "arrowdown") { select(selected() + 1); }
  else if (key === "k" || key === "arrowup") { select(selected() - 1); }
  else if (key === "enter") { confirmSelected(); }
  else if (key === "n") { document.getElementById("declare-new").click(); }
  else if (key === "a") { event.preventDefault(); document.getElementById("assign-id").focus(); }
  else if (key === "s") { document.getElementById("skip").click(); }
  else if (key === "u") {
    const last = sessionStorage.getItem("deer-last-change");
    if (!last) { say("Nothing of yours to undo in this tab.", true); return; }
    try {
      await send("POST", "/v1/audit/" + last + "/undo", {});
      sessionStorage.removeItem("deer-last-change");
      say("Undone change #" + last + ".");
      setTimeout(() => location.reload(), 600);
    } catch (e) { /* said */ }
  } else { return; }
  event.preventDefault();
});

// Census question mode: one key answers the pair shown, and the page moves to the next question.
async function answerQuestion(answer) {
  const question = document.getElementById("question");
  if (!question) return;
  document.querySelectorAll("button.answer").forEach(b => { b.disabled = true; });
  try {
    const data = await send("POST", "/v1/census/questions/" + question.dataset.question + "/answer", {answer});
    say(answer === "skip" ? "Skipped." : "Answered '" + answer + "' (answer #" + data.answer.id + ").");
    setTimeout(() => location.reload(), 150);
  } catch (e) {
    setTimeout(() => location.reload(), 900);  // taken by someone else, or refused: the next question
  }
}

document.querySelectorAll("button.answer").forEach(b => b.addEventListener("click", () => answerQuestion(b.dataset.answer)));
wire("toggle-evidence", () => { const e = document.getElementById("evidence"); e.hidden = !e.hidden; });

document.addEventListener("keydown", (event) => {
  if (!document.getElementById("question")) return;
  if (event.target.closest("input, textarea, select") || event.metaKey || event.ctrlKey || event.altKey) return;
  const answers = {s: "same", d: "different", c: "cannot-tell", x: "skip"};
  const key = event.key.toLowerCase();
  if (answers[key]) { event.preventDefault(); answerQuestion(answers[key]); }
  else if (key === "i") { event.preventDefault(); document.getElementById("toggle-evidence").click(); }
});
