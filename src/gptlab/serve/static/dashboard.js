// The training dashboard. /runs: every run in the served folder with its state and latest numbers, and the
// curves of the runs ticked, overlaid. /runs/NAME: one run's curves (polled every 2 s for the rows added since
// the last look, so a run that trains draws as it goes), its recent samples, eval results and config.
"use strict";

(() => {
  const $ = id => document.getElementById(id);
  const POLL = 2000;
  const runs = {};            // name -> {rows: [...], next} (the metrics rows fetched so far, the next row to ask for)
  let xAxis = localStorage.getItem("gptlab.xaxis") === "tokens" ? "tokens" : "step";

  function showError(e) {
    const text = !e ? "" : e.status === 401 ? "This server needs its API key: enter it at the top right." : e.message || String(e);
    $("error").textContent = text;
  }

  const api = name => "/api/runs/" + encodeURIComponent(name);

  // Fetch the rows added since the last call (a long history in several calls); a rewritten metrics.csv
  // (a resumed run) starts over. True when there is something new to draw.
  async function pull(name) {
    const run = runs[name] || (runs[name] = { rows: [], next: 0 });
    let changed = false;
    for (;;) {
      const r = await gl.getJSON(api(name) + "/metrics?since=" + run.next);
      if (r.reset) run.rows = [];
      for (const row of r.rows) run.rows.push(row);  // not push(...rows): too many arguments for a long run
      run.next = r.next;
      changed = changed || r.rows.length > 0 || r.reset;
      if (!r.rows.length || r.next >= r.total) return changed;
    }
  }

  function points(rows, key) {
    return rows.filter(r => r[key] !== null && r[key] !== undefined && r[xAxis] !== null).map(r => [r[xAxis], r[key]]);
  }

  function stateBadge(state, reason) {
    return gl.el("span", { class: "state " + state, text: state, title: reason || null, "data-state": state });
  }

  function setupAxis(redraw) {
    for (const seg of document.querySelectorAll("[data-axis]")) {
      for (const b of seg.querySelectorAll("button")) {
        b.classList.toggle("on", b.dataset.x === xAxis);
        b.addEventListener("click", () => {
          xAxis = b.dataset.x;
          localStorage.setItem("gptlab.xaxis", xAxis);
          for (const o of seg.querySelectorAll("button")) o.classList.toggle("on", o === b);
          redraw();
        });
      }
    }
  }

  function makeCharts(container, specs) {
    const charts = {};
    for (const [key, title, opts] of specs) {
      const box = gl.el("div", { class: "panel", "data-chart": key });
      container.append(box);
      charts[key] = new LineChart(box, Object.assign({ title, x: xAxis }, opts || {}));
    }
    return charts;
  }

  // ---- the list of runs, and several compared -------------------------------------------------------------------
  async function listView() {
    $("list-view").classList.remove("hidden");
    document.title = "gptlab runs";
    const selected = new Set((new URLSearchParams(location.hash.slice(1)).get("compare") || "").split(",").filter(Boolean));
    const specs = [["loss", "training loss"], ["val_loss", "validation loss", { markers: true }],
                   ["lr", "learning rate"], ["tokens_per_s", "tokens per second", { digits: 0 }]];
    let charts = null;

    function drawCompare() {
      const names = [...selected].filter(n => runs[n]);
      $("compare-note").textContent = names.length ? names.join(", ") : "tick runs above to overlay their curves";
      if (!names.length) { $("compare-charts").replaceChildren(); charts = null; return; }
      if (!charts) charts = makeCharts($("compare-charts"), specs);
      for (const [key, , opts] of specs) {
        charts[key].options.x = xAxis;
        charts[key].set(names.map(n => ({ name: n, points: points(runs[n].rows, key), markers: opts && opts.markers })));
      }
    }

    async function refresh() {
      let list;
      try { list = await gl.getJSON("/api/runs"); showError(null); } catch (e) { showError(e); return; }
      $("root").textContent = list.root;
      const body = $("runs").querySelector("tbody");
      body.replaceChildren(...list.data.map(r => {
        const box = gl.el("input", { type: "checkbox", checked: selected.has(r.name), "aria-label": "compare " + r.name });
        box.addEventListener("change", async () => {
          if (box.checked) selected.add(r.name); else selected.delete(r.name);
          history.replaceState(null, "", selected.size ? "#compare=" + [...selected].join(",") : location.pathname);
          if (box.checked) await pull(r.name).catch(showError);
          drawCompare();
        });
        return gl.el("tr", { "data-run": r.name },
          gl.el("td", {}, box),
          gl.el("td", {}, gl.el("a", { href: "/runs/" + encodeURIComponent(r.name), text: r.name })),
          gl.el("td", {}, stateBadge(r.state, r.reason)),
          gl.el("td", { class: "num", text: r.step === null ? "–" : r.step.toLocaleString() }),
          gl.el("td", { class: "num", text: gl.count(r.tokens) }),
          gl.el("td", { class: "num", text: gl.fmt(r.loss, 4) }),
          gl.el("td", { class: "num", text: gl.fmt(r.val_loss, 4) }),
          gl.el("td", { class: "num", text: r.tokens_per_s === null ? "–" : gl.count(Math.round(r.tokens_per_s)) }),
          gl.el("td", { class: "num", text: String(r.checkpoints) }),
          gl.el("td", { class: "muted", text: gl.ago(r.updated) }),
          gl.el("td", {}, r.checkpoints ? gl.el("a", { href: "/?model=" + encodeURIComponent(r.name), text: "play" }) : null));
      }));
      $("list-note").textContent = list.data.length ? "" :
        "No runs here yet: a run is a folder with config.toml or metrics.csv (gptlab train writes both as it starts).";
      const names = [...selected].filter(n => list.data.some(r => r.name === n));
      const training = new Set(list.data.filter(r => r.state === "training").map(r => r.name));
      await Promise.all(names.filter(n => !runs[n] || training.has(n)).map(n => pull(n).catch(showError)));
      drawCompare();
    }

    setupAxis(drawCompare);
    document.addEventListener("gptlab:key", refresh);
    await refresh();
    setInterval(refresh, 3000);
  }

  // ---- one run --------------------------------------------------------------------------------------------------
  async function runView(name) {
    $("run-view").classList.remove("hidden");
    $("run-name").textContent = name;
    document.title = name + " · gptlab";
    const charts = makeCharts($("run-charts"), [
      ["loss", "loss"], ["lr", "learning rate"], ["tokens_per_s", "tokens per second", { digits: 0 }],
      ["grad_norm", "gradient norm"]]);
    $("logloss").checked = localStorage.getItem("gptlab.logloss") === "1";
    $("logloss").addEventListener("change", () => {
      localStorage.setItem("gptlab.logloss", $("logloss").checked ? "1" : "0");
      draw();
    });

    function draw() {
      const rows = runs[name] ? runs[name].rows : [];
      for (const c of Object.values(charts)) c.options.x = xAxis;
      charts.loss.options.log = $("logloss").checked;
      charts.loss.set([{ name: "train", points: points(rows, "loss") },
                       { name: "validation", points: points(rows, "val_loss"), markers: true }]);
      charts.lr.set([{ name: "lr", points: points(rows, "lr") }]);
      charts.tokens_per_s.set([{ name: "tokens/s", points: points(rows, "tokens_per_s") }]);
      charts.grad_norm.set([{ name: "grad norm", points: points(rows, "grad_norm") }]);
    }
    setupAxis(draw);

    let summary = null, lastSampleStep = null, evalSeen = null;

    function kv(label, value) { return gl.el("div", {}, gl.el("span", { text: label }), gl.el("b", { text: value })); }

    async function refresh() {
      try {
        summary = await gl.getJSON(api(name));
        showError(null);
      } catch (e) {
        showError(e.status === 404 ? new Error(`There is no run named "${name}" in the served folder.`) : e);
        return false;
      }
      $("run-state").replaceWith(Object.assign(stateBadge(summary.state, summary.reason), { id: "run-state" }));
      $("run-view").dataset.state = summary.state;
      $("play").classList.toggle("hidden", !summary.checkpoints);
      $("play").href = "/?model=" + encodeURIComponent(name);
      $("run-kv").replaceChildren(
        kv("step", summary.step === null ? "–" : summary.step.toLocaleString()), kv("tokens", gl.count(summary.tokens)),
        kv("loss", gl.fmt(summary.loss, 4)), kv("val loss", gl.fmt(summary.val_loss, 4)), kv("learning rate", gl.fmt(summary.lr, 3)),
        kv("tokens/s", summary.tokens_per_s === null ? "–" : gl.count(Math.round(summary.tokens_per_s))),
        kv("checkpoints", String(summary.checkpoints)), kv("updated", gl.ago(summary.updated)));
      if (await pull(name).catch(e => { showError(e); return false; })) draw();
      $("poll-note").textContent = summary.state === "training" ? "live: updates every 2 s" : "";
      // samples: on the first look, then when the run has stepped on and has some
      if (lastSampleStep === null || (summary.has.samples && summary.step !== lastSampleStep)) {
        lastSampleStep = summary.step ?? -1;
        loadSamples();
      }
      if (evalSeen !== summary.has.eval) { evalSeen = summary.has.eval; loadEval(); }  // first look, or eval.json appeared
      return summary.state === "training";
    }

    async function loadSamples() {
      const r = await gl.getJSON(api(name) + "/samples").catch(() => ({ data: [] }));
      $("samples").replaceChildren(...(r.data.length ? r.data.slice(0, 5).map(s => gl.el("div", { class: "sample" },
        gl.el("div", { class: "step", text: "step " + s.step.toLocaleString() + (s.prompt ? " · prompt " + JSON.stringify(s.prompt) : "") }),
        gl.el("pre", { class: "code", text: s.text }))) : [gl.el("p", { class: "muted", text: "No samples yet (train.sample_every sets how often the trainer writes one)." })]));
    }

    async function loadEval() {
      const r = await gl.getJSON(api(name) + "/eval").catch(() => ({ report: null }));
      const report = r.report;
      if (!report) {
        $("eval").replaceChildren(gl.el("p", { class: "muted" }, "Not evaluated yet: ",
          gl.el("code", { text: "gptlab eval runs/" + name }), " writes eval.json and eval.md in the run folder."));
        return;
      }
      const nodes = [gl.el("p", { class: "muted", text: `checkpoint ${report.checkpoint || "?"}, step ${report.step ?? "?"}` +
        (report.parameters ? `, ${gl.count(report.parameters)} parameters` : "") })];
      const sets = report.datasets || [];
      if (sets.length) {
        const ks = Object.keys(sets[0].topk || {});
        nodes.push(gl.el("table", { class: "evals" },
          gl.el("tr", {}, ...["data", "loss", "perplexity", "bits/byte", ...ks.map(k => "top-" + k)].map(t => gl.el("th", { text: t }))),
          ...sets.map(d => gl.el("tr", {}, gl.el("td", { text: d.name }), gl.el("td", { text: gl.fmt(d.loss, 4) }),
            gl.el("td", { text: gl.fmt(d.perplexity, 2) }), gl.el("td", { text: gl.fmt(d.bpb, 4) }),
            ...ks.map(k => gl.el("td", { text: d.topk && d.topk[k] !== undefined ? (100 * d.topk[k]).toFixed(1) + "%" : "–" }))))));
      }
      if (report.hellaswag) {
        const h = report.hellaswag;
        nodes.push(gl.el("p", { text: `HellaSwag (${h.items} items): acc ${(100 * h.acc).toFixed(1)}%, acc_norm ${(100 * h.acc_norm).toFixed(1)}% (chance 25%)` }));
      }
      if (report.instructions) {
        nodes.push(gl.el("p", { text: `Instruction following: ${(100 * report.instructions.rate).toFixed(1)}% follow all` }));
      }
      if (r.markdown) {
        nodes.push(gl.el("details", {}, gl.el("summary", { class: "muted", text: "eval.md" }), gl.el("pre", { class: "code", text: r.markdown })));
      }
      $("eval").replaceChildren(...nodes);
    }

    async function loadConfig() {
      const cfg = await gl.getJSON(api(name) + "/config").catch(() => ({ toml: null }));
      $("config").textContent = cfg.toml || "(no config.toml)";
    }
    document.addEventListener("gptlab:key", () => { evalSeen = null; lastSampleStep = null; loadConfig(); refresh(); });
    await loadConfig();
    await refresh();
    // Poll every 2 s while the run trains; look again every 10 s otherwise (a run may start or resume).
    let wait = POLL;
    const loop = async () => { const live = await refresh(); wait = live ? POLL : 10000; setTimeout(loop, wait); };
    setTimeout(loop, wait);
  }

  const match = location.pathname.match(/^\/runs\/([^/]+)\/?$/);
  (match ? runView(decodeURIComponent(match[1])) : listView()).catch(showError);
})();
