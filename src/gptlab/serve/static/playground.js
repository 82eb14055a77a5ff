// The playground: a prompt (POST /v1/completions) or a conversation (POST /v1/chat/completions), streamed,
// every generated token a span that shows its probability and the top alternatives on hover.
"use strict";

(() => {
  const $ = id => document.getElementById(id);
  const TOP = 5;             // alternatives asked for per token
  const LOW = 0.1;           // a token drawn with less than this probability is underlined
  let models = [];
  let controller = null;     // the running request's AbortController: Stop aborts it and the server frees the slot
  let messages = [];         // the conversation so far (chat mode), without the system message

  // ---- settings -------------------------------------------------------------------------------------------------
  const SLIDERS = ["temperature", "top_p", "top_k", "max_tokens"];
  const STORE = "gptlab.playground";

  function showValue(id) {
    const v = Number($(id).value);
    $(id + "-v").textContent = id === "top_k" && v === 0 ? "off" : v;
  }

  function loadSettings() {
    let saved = {};
    try { saved = JSON.parse(localStorage.getItem(STORE) || "{}"); } catch (e) { /* start over */ }
    for (const id of [...SLIDERS, "seed", "stop", "system"]) if (saved[id] !== undefined) $(id).value = saved[id];
    return saved;
  }

  function saveSettings() {
    const s = { model: $("model").value, mode: mode() };
    for (const id of [...SLIDERS, "seed", "stop", "system"]) s[id] = $(id).value;
    localStorage.setItem(STORE, JSON.stringify(s));
  }

  function stops() {
    return $("stop").value.split("\n").filter(s => s !== "")
      .map(s => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t")).slice(0, 4);
  }

  function sampling() {
    const body = {
      model: $("model").value,
      temperature: Number($("temperature").value),
      top_p: Number($("top_p").value),
      max_tokens: Number($("max_tokens").value),
      stream: true,
    };
    const k = Number($("top_k").value);
    if (k > 0) body.top_k = k;
    const seed = $("seed").value.trim();
    if (seed !== "") body.seed = Number(seed);
    const stop = stops();
    if (stop.length) body.stop = stop;
    return body;
  }

  function mode() { return document.querySelector("input[name=mode]:checked").value; }

  function current() { return models.find(m => m.id === $("model").value); }

  // Chat needs a run whose tokenizer has chat tokens; a base model says why the Chat tab is off.
  function updateMode() {
    const m = current();
    const chatInput = document.querySelector("input[name=mode][value=chat]");
    const canChat = !!(m && m.chat);
    chatInput.disabled = !canChat;
    if (!canChat && mode() === "chat") document.querySelector("input[name=mode][value=completion]").checked = true;
    $("mode-note").textContent = m && !canChat
      ? m.id + " is a base model (its tokenizer has no chat tokens), so it has no chat mode: fine-tune it with `gptlab sft` for one."
      : "";
    const chat = mode() === "chat";
    $("completion-mode").classList.toggle("hidden", chat);
    $("chat-mode").classList.toggle("hidden", !chat);
    if (m && m.context_length) {
      $("max_tokens").max = m.context_length;
      if (Number($("max_tokens").value) > m.context_length) $("max_tokens").value = m.context_length;
      showValue("max_tokens");
    }
  }

  async function loadModels() {
    const saved = loadSettings();
    try {
      const r = await gl.getJSON("/v1/models");
      models = r.data || [];
    } catch (e) {
      status(e.status === 401 ? "Enter the API key above to use this server." : "Could not list the models: " + e.message, true);
      return;
    }
    status("");
    const select = $("model");
    select.replaceChildren(...models.map(m => gl.el("option", { value: m.id, text: m.id + (m.chat ? "  (chat)" : "") })));
    const wanted = new URLSearchParams(location.search).get("model") || saved.model;
    if (models.some(m => m.id === wanted)) select.value = wanted;
    if (saved.mode === "chat") document.querySelector("input[name=mode][value=chat]").checked = true;
    if (!models.length) status("This server offers no trained run yet: train one, or open the Runs page to watch it train.", true);
    updateMode();
  }

  // ---- tokens and their tooltip ---------------------------------------------------------------------------------
  function visible(token) {  // a token as the tooltip shows it: spaces and line breaks made visible
    return token.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5") || "\u2205";
  }

  function tokenSpan(token, logprob, top) {
    const span = gl.el("span", { class: "tok", text: token });
    if (logprob !== null && logprob !== undefined) {
      const p = Math.exp(logprob);
      span.dataset.p = p.toFixed(6);
      if (p < LOW) span.classList.add("low");
    }
    span._alts = top || [];
    return span;
  }

  const tip = $("tooltip");

  function showTip(span) {
    const p = span.dataset.p === undefined ? null : Number(span.dataset.p);
    // bars relative to the likeliest alternative: a small model's probabilities are all small
    const scale = Math.max(1e-9, ...span._alts.map(([, lp]) => Math.exp(lp)));
    const rows = span._alts.map(([tok, lp]) => {
      const q = Math.exp(lp);
      return gl.el("tr", { class: tok === span.textContent ? "chosen" : null },
        gl.el("td", { text: visible(tok) }),
        gl.el("td", { class: "bar" }, gl.el("span", { style: `width:${Math.max(2, 100 * q / scale).toFixed(1)}%` })),
        gl.el("td", { class: "p", text: (q * 100).toFixed(q < 0.01 ? 2 : 1) + "%" }));
    });
    tip.replaceChildren(
      gl.el("div", { class: "head" }, gl.el("b", { text: visible(span.textContent) }), " ",
        gl.el("span", { class: "vis", text: p === null ? "(no probability)" : (p * 100).toFixed(p < 0.01 ? 2 : 1) + "%" })),
      rows.length ? gl.el("table", {}, ...rows) : gl.el("div", { class: "muted", text: "no alternatives reported" }));
    tip.classList.remove("hidden");
    const box = span.getBoundingClientRect();
    const w = tip.offsetWidth, h = tip.offsetHeight;
    let left = Math.min(box.left, window.innerWidth - w - 8);
    let top = box.bottom + 6;
    if (top + h > window.innerHeight - 8) top = box.top - h - 6;
    tip.style.left = Math.max(8, left) + "px";
    tip.style.top = Math.max(8, top) + "px";
  }

  document.addEventListener("mouseover", e => {
    const span = e.target.closest && e.target.closest(".tok");
    if (span) showTip(span); else tip.classList.add("hidden");
  });

  // Completions' logprobs: {tokens, token_logprobs, top_logprobs: [{token: logprob}]} -> spans.
  function completionSpans(choice) {
    const lp = choice.logprobs;
    if (!lp || !lp.tokens || !lp.tokens.length) return choice.text ? [tokenSpan(choice.text, null, [])] : [];
    return lp.tokens.map((t, i) => {
      const top = Object.entries((lp.top_logprobs && lp.top_logprobs[i]) || {}).sort((a, b) => b[1] - a[1]);
      return tokenSpan(t, lp.token_logprobs ? lp.token_logprobs[i] : null, top);
    });
  }

  // Chat's logprobs: {content: [{token, logprob, top_logprobs: [{token, logprob}]}]} -> spans.
  function chatSpans(choice) {
    const content = choice.logprobs && choice.logprobs.content;
    const text = choice.delta && choice.delta.content;
    if (!content || !content.length) return text ? [tokenSpan(text, null, [])] : [];
    return content.map(c => tokenSpan(c.token, c.logprob, (c.top_logprobs || []).map(a => [a.token, a.logprob])));
  }

  // ---- running a request ----------------------------------------------------------------------------------------
  function status(text, isError) {
    $("status").textContent = text;
    $("status").classList.toggle("error", !!isError);
  }

  function busy(on) {
    for (const id of ["generate", "send"]) $(id).disabled = on;
    for (const id of ["stop-btn", "chat-stop"]) $(id).disabled = !on;
  }

  // Streams one request into `target`; returns the generated text (so far, when stopped).
  async function run(url, body, target, toSpans) {
    controller = new AbortController();
    busy(true);
    target.dataset.state = "streaming";
    const started = performance.now();
    let first = null, count = 0, reason = null, text = "", usage = null;
    status("generating…");
    try {
      await gl.stream(url, body, chunk => {
        const choice = chunk.choices && chunk.choices[0];
        if (chunk.usage) usage = chunk.usage;
        if (!choice) return;
        const spans = toSpans(choice);
        if (spans.length && first === null) first = performance.now();
        for (const s of spans) { target.append(s); text += s.textContent; count++; }
        if (choice.finish_reason) reason = choice.finish_reason;
        target.scrollTop = target.scrollHeight;
      }, controller.signal);
      target.dataset.state = "done";
    } catch (e) {
      if (e.name === "AbortError") { reason = "stopped"; target.dataset.state = "done"; }
      else { target.dataset.state = "error"; status(e.message, true); busy(false); controller = null; return text; }
    }
    const seconds = (performance.now() - started) / 1000;
    const n = usage ? usage.completion_tokens : count;
    const parts = [`${n} tokens in ${seconds.toFixed(2)} s`];
    if (first !== null) parts.push(`first token after ${((first - started) / 1000).toFixed(2)} s`);
    if (n > 1 && first !== null) parts.push(`${(n / Math.max(1e-3, (performance.now() - first) / 1000)).toFixed(0)} tokens/s`);
    if (reason) parts.push(reason === "length" ? "stopped at max_tokens" : reason === "stop" ? "ended (stop)" : reason);
    status(parts.join(" · "));
    busy(false);
    controller = null;
    return text;
  }

  async function generate() {
    const out = $("output");
    const prompt = $("prompt").value;
    out.replaceChildren(gl.el("span", { class: "prompt", text: prompt }));
    saveSettings();
    const body = Object.assign(sampling(), { prompt, logprobs: TOP });
    await run("/v1/completions", body, out, completionSpans);
  }

  function renderMessage(role, content) {
    const body = gl.el("div", { class: "body", text: content || "" });
    const node = gl.el("div", { class: "msg " + role }, gl.el("div", { class: "who", text: role }), body);
    $("chatlog").append(node);
    $("chatlog").scrollTop = $("chatlog").scrollHeight;
    return body;
  }

  async function send() {
    const text = $("message").value.trim();
    if (!text) return;
    $("message").value = "";
    saveSettings();
    messages.push({ role: "user", content: text });
    renderMessage("user", text);
    const target = renderMessage("assistant", "");
    const system = $("system").value.trim();
    const all = system ? [{ role: "system", content: system }, ...messages] : messages;
    const body = Object.assign(sampling(), { messages: all, logprobs: true, top_logprobs: TOP });
    const log = $("chatlog");
    log.dataset.state = "streaming";
    const reply = await run("/v1/chat/completions", body, target, chatSpans);
    log.dataset.state = target.dataset.state;
    if (target.dataset.state === "error") messages.pop();  // not answered: the user can send it again
    else messages.push({ role: "assistant", content: reply });
  }

  function reset() {
    if (controller) controller.abort();
    messages = [];
    $("chatlog").replaceChildren();
    status("");
  }

  // ---- wiring ---------------------------------------------------------------------------------------------------
  for (const id of SLIDERS) { $(id).addEventListener("input", () => showValue(id)); showValue(id); }
  $("model").addEventListener("change", () => { updateMode(); reset(); saveSettings(); });
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", () => { updateMode(); saveSettings(); });
  $("generate").addEventListener("click", generate);
  $("send").addEventListener("click", send);
  $("stop-btn").addEventListener("click", () => controller && controller.abort());
  $("chat-stop").addEventListener("click", () => controller && controller.abort());
  $("clear").addEventListener("click", () => { $("output").replaceChildren(); status(""); });
  $("reset").addEventListener("click", reset);
  $("prompt").addEventListener("keydown", e => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
  $("message").addEventListener("keydown", e => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
  document.addEventListener("gptlab:key", loadModels);
  loadModels();
})();
