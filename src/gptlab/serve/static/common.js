// What both pages share: the API key (asked for when the server needs one, kept in localStorage), requests
// with it, reading a server-sent-event stream, and number formatting.
"use strict";

const gl = (() => {
  const KEY = "gptlab.apiKey";

  function apiKey() { return localStorage.getItem(KEY) || ""; }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = apiKey();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  // The key field in the header: shown when /health says a key is required or a request got a 401.
  function setupKey() {
    const box = document.getElementById("apikey");
    if (!box) return;
    const input = box.querySelector("input");
    input.value = apiKey();
    input.addEventListener("change", () => {
      localStorage.setItem(KEY, input.value.trim());
      box.classList.remove("needed");
      document.dispatchEvent(new Event("gptlab:key"));
    });
    fetch("/health").then(r => r.ok ? r.json() : null).then(h => {
      if (h && h.api_key_required) box.classList.add("shown");
    }).catch(() => {});
  }

  function askKey() {
    const box = document.getElementById("apikey");
    if (box) { box.classList.add("shown", "needed"); box.querySelector("input").focus(); }
  }

  // An Error carrying the server's message (OpenAI-style body) or the HTTP status.
  async function failure(response) {
    let message = response.status + " " + response.statusText;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (e) { /* not JSON */ }
    if (response.status === 401) askKey();
    const err = new Error(message);
    err.status = response.status;
    return err;
  }

  async function getJSON(url) {
    const r = await fetch(url, { headers: headers(), cache: "no-store" });
    if (!r.ok) throw await failure(r);
    return r.json();
  }

  // POST body with stream: true; calls onChunk(obj) for each `data: {json}` event until `data: [DONE]`.
  async function stream(url, body, onChunk, signal) {
    const r = await fetch(url, {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body), signal,
    });
    if (!r.ok) throw await failure(r);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/).filter(l => l.startsWith("data:")).map(l => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message || "the server reported an error");
        onChunk(obj);
      }
    }
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(digits === undefined ? 2 : digits);
    return x.toLocaleString(undefined, { maximumFractionDigits: digits === undefined ? 4 : digits });
  }

  function count(x) {  // 1234567 -> 1.23M
    if (x === null || x === undefined) return "–";
    const units = [[1e9, "B"], [1e6, "M"], [1e3, "k"]];
    for (const [n, u] of units) if (Math.abs(x) >= n) return (x / n).toFixed(x / n >= 100 ? 0 : x / n >= 10 ? 1 : 2) + u;
    return String(x);
  }

  function ago(seconds) {  // a unix time -> "12 s ago"
    if (!seconds) return "–";
    const d = Math.max(0, Date.now() / 1000 - seconds);
    if (d < 60) return Math.round(d) + " s ago";
    if (d < 3600) return Math.round(d / 60) + " min ago";
    if (d < 86400) return Math.round(d / 3600) + " h ago";
    return new Date(seconds * 1000).toLocaleDateString();
  }

  document.addEventListener("DOMContentLoaded", setupKey);
  return { apiKey, headers, getJSON, stream, el, fmt, count, ago, askKey };
})();
