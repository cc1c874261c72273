"""The inbox at ``/_emulator/``: one HTML page showing what the emulator received.

Contacts, events, emails and calls, newest first, filterable by address. The page's script
polls the admin JSON endpoints and builds the page with ``textContent`` only, so no value
it shows is ever parsed as HTML; its Content Security Policy allows that one script and
style, and connections to its own origin only.
"""

from __future__ import annotations

import base64
import hashlib

__all__ = ["HEADERS", "PAGE"]

_STYLE = """
:root { color-scheme: light dark; font: 15px/1.4 system-ui, sans-serif; }
body { margin: 0 auto; max-width: 80rem; padding: 0 .75rem 2rem; }
header { position: sticky; top: 0; background: Canvas; padding: .5rem 0;
  display: flex; flex-wrap: wrap; gap: .5rem; align-items: center;
  border-bottom: 1px solid #8886; }
h1 { font-size: 1.1rem; margin: 0; flex: 1 1 100%; }
h2 { font-size: 1rem; margin: 1rem 0 .25rem; }
input, select { font: inherit; }
input { flex: 1 1 12rem; min-width: 0; }
main { display: grid; gap: 0 1rem;
  grid-template-columns: repeat(auto-fit, minmax(min(100%, 22rem), 1fr)); }
section, li, dd, dt { min-width: 0; }
ol { list-style: none; margin: 0; padding: 0; }
li { border: 1px solid #8886; border-radius: 6px; padding: .4rem .6rem; margin: .4rem 0;
  overflow-wrap: anywhere; }
.head { display: flex; flex-wrap: wrap; gap: 0 .6rem; justify-content: space-between; }
.meta, dt, .empty { color: GrayText; }
.meta { font-size: .85em; }
dl { display: grid; grid-template-columns: minmax(0, max-content) minmax(0, 1fr);
  gap: 0 .6rem; margin: .3rem 0 0; font-size: .9em; }
dd { margin: 0; font-family: ui-monospace, monospace; white-space: pre-wrap; }
.tag { display: inline-block; padding: 0 .45rem; margin: .2rem .25rem 0 0;
  border-radius: 1rem; background: #8883; font-size: .85em; }
.failed { color: #d33; }
.empty { border-style: dashed; }
"""

_SCRIPT = """
"use strict";
const LIMIT = 200;
const NAMES = ["contacts", "events", "sends", "requests"];
const $ = (id) => document.getElementById(id);
const filter = $("filter"), env = $("env"), status = $("status");
const params = new URLSearchParams(location.search);
filter.value = params.get("address") || "";
env.value = params.get("environment") === "test" ? "test" : "live";
let data = null, seen = "";

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}
const show = (v) => (typeof v === "string" ? v : JSON.stringify(v));
const clock = (seconds) => new Date(seconds * 1000).toISOString().slice(11, 19);

function pairs(object) {
  const dl = el("dl");
  for (const [k, v] of Object.entries(object || {})) {
    if (v !== null && v !== undefined) dl.append(el("dt", "", k), el("dd", "", show(v)));
  }
  return dl;
}

function card(title, meta, ...body) {
  const head = el("div", "head");
  head.append(el("strong", "", title), meta);
  const li = el("li");
  li.append(head, ...body);
  return li;
}

function list(id, items, build, empty) {
  const newest = items.slice().reverse();
  const nodes = newest.slice(0, LIMIT).map(build);
  if (newest.length > LIMIT) nodes.push(el("li", "empty", `and ${newest.length - LIMIT} older`));
  if (!nodes.length) nodes.push(el("li", "empty", empty));
  $("n-" + id).textContent = `(${items.length})`;
  $(id).replaceChildren(...nodes);
}

function addresses(call, emails) {
  const body = call.body && typeof call.body === "object" ? call.body : {};
  const bulk = Array.isArray(body.emails) ? body.emails : [];
  const found = [body.email, body.to_email, call.query.email, ...bulk];
  const id = /^\\/api\\/v1\\/contacts\\/([^/]+)\\//.exec(call.path);
  if (id) found.push(emails.get(id[1]));
  return found.filter((a) => typeof a === "string");
}

function render() {
  const q = filter.value.trim().toLowerCase();
  const has = (found) => !q || found.some((a) => a.toLowerCase().includes(q));
  const empty = q ? "Nothing for this address." : "Nothing yet.";
  const emails = new Map(data.contacts.map((c) => [c.id, c.email]));
  list("contacts", data.contacts.filter((c) => has([c.email])), (c) => {
    const tags = el("div");
    for (const t of c.tags) tags.append(el("span", "tag", t.name));
    const { external_id, first_name, last_name, display_name, source } = c;
    const identity = { external_id, first_name, last_name, display_name, source };
    const meta = el("span", "meta", c.status);
    return card(c.email, meta, tags, pairs(identity), pairs(c.custom_fields));
  }, empty);
  list("events", data.events.filter((e) => has([e.email])), (e) => {
    const meta = el("span", "meta", `${e.email} · ${e.timestamp.slice(11, 19)}`);
    return card(e.event_name, meta, pairs(e.properties));
  }, empty);
  list("sends", data.sends.filter((s) => has([s.to_email])), (s) => {
    const meta = el("span", "meta", `${s.status} · ${s.created_at.slice(11, 19)}`);
    return card(`${s.trigger_key} → ${s.to_email}`, meta, pairs(s.variables));
  }, empty);
  list("requests", data.requests.filter((r) => has(addresses(r, emails))), (r) => {
    const failed = r.status === null || r.status >= 400;
    const answer = r.status === null ? "dropped" : String(r.status);
    const meta = el("span", failed ? "meta failed" : "meta", `${answer} · ${clock(r.time)}`);
    const path = r.path.replace(/^\\/api\\/v1/, "");
    const about = addresses(r, emails).join(", ");
    return card(`${r.method} ${path}`, meta, pairs({ address: about || null, fault: r.fault }));
  }, empty);
}

function remember() {
  const p = new URLSearchParams();
  if (filter.value.trim()) p.set("address", filter.value.trim());
  if (env.value === "test") p.set("environment", "test");
  const query = p.toString();
  history.replaceState(null, "", query ? "?" + query : location.pathname);
}

async function refresh() {
  try {
    const answers = await Promise.all(NAMES.map(async (name) => {
      const answer = await fetch(`${name}?environment=${env.value}`, { cache: "no-store" });
      if (!answer.ok) throw new Error(`${name}: ${answer.status}`);
      return answer.text();
    }));
    const text = env.value + answers.join("\\n");
    if (text !== seen) {
      seen = text;
      data = Object.fromEntries(NAMES.map((name, i) => [name, JSON.parse(answers[i])]));
      render();
    }
    status.textContent = `Updated ${clock(Date.now() / 1000)} UTC`;
  } catch (error) {
    status.textContent = "The emulator does not answer; retrying.";
  }
}

async function poll() {
  await refresh();
  setTimeout(poll, 1000);
}

filter.addEventListener("input", () => { remember(); if (data) render(); });
env.addEventListener("change", () => { remember(); refresh(); });
poll();
"""

_BODY = """
<header>
  <h1>Meisa emulator: what Meisa received</h1>
  <input id="filter" type="search" placeholder="Filter by address" aria-label="Address">
  <select id="env" aria-label="Environment">
    <option value="live">live</option><option value="test">test</option>
  </select>
  <span id="status" class="meta">Loading.</span>
</header>
<main>
  <section><h2>Contacts <span id="n-contacts"></span></h2><ol id="contacts"></ol></section>
  <section><h2>Emails <span id="n-sends"></span></h2><ol id="sends"></ol></section>
  <section><h2>Events <span id="n-events"></span></h2><ol id="events"></ol></section>
  <section><h2>Calls <span id="n-requests"></span></h2><ol id="requests"></ol></section>
</main>
"""


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: The page, UTF-8.
PAGE = (
    '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    '<link rel="icon" href="data:,">\n'
    "<title>Meisa emulator inbox</title>\n<style>"
    + _STYLE
    + "</style></head>\n<body>"
    + _BODY
    + "<script>"
    + _SCRIPT
    + "</script></body></html>\n"
).encode()

#: The page's response headers.
HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_digest(_SCRIPT)}; style-src {_digest(_STYLE)}; "
        "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
