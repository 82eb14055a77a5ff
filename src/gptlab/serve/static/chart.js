// A small line chart on a canvas: axes with round ticks, a legend, several series, and a readout of every
// series' value at the step under the pointer. Written here so the pages need no library from elsewhere.
//
//   const c = new LineChart(container, {title: "loss", x: "step", log: false});
//   c.set([{name: "train", points: [[x, y], ...]}, {name: "val", points, markers: true}]);
//
// The container's data-points attribute is the number of points drawn (the browser test watches it grow).
"use strict";

class LineChart {
  constructor(container, options) {
    this.options = Object.assign({ title: "", x: "step", y: "", log: false, digits: 4 }, options || {});
    this.series = [];
    this.hover = null;
    this.root = container;
    container.classList.add("chart");
    container.dataset.points = "0";
    this.legend = gl.el("div", { class: "legend" });
    container.append(
      gl.el("div", { class: "title" }, this.titleText = gl.el("span", { text: this.options.title }), this.legend),
      this.canvas = gl.el("canvas"),
      this.readout = gl.el("div", { class: "readout hidden" }));
    this.canvas.addEventListener("mousemove", e => { this.hover = this.canvasPoint(e); this.draw(); });
    this.canvas.addEventListener("mouseleave", () => { this.hover = null; this.draw(); });
    if (window.ResizeObserver) new ResizeObserver(() => this.draw()).observe(this.canvas);
    window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => this.draw());
  }

  static color(i) {
    const css = getComputedStyle(document.documentElement);
    return css.getPropertyValue("--series-" + ((i % 6) + 1)).trim() || "#2f6fdb";
  }

  set(series) {
    this.series = series.map((s, i) => Object.assign({ color: s.color || LineChart.color(i) }, s));
    const n = this.series.reduce((a, s) => a + s.points.length, 0);
    this.root.dataset.points = String(n);
    this.legend.replaceChildren(...this.series.filter(s => s.points.length || this.series.length > 1).map(s =>
      gl.el("span", {}, gl.el("i", { style: "background:" + s.color + (s.dashed ? ";opacity:.6" : "") }), s.name)));
    this.draw();
  }

  canvasPoint(e) {
    const r = this.canvas.getBoundingClientRect();
    return { x: e.clientX - r.left, y: e.clientY - r.top };
  }

  // Round tick values covering [lo, hi], about `count` of them.
  static ticks(lo, hi, count) {
    if (!(hi > lo)) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
    const raw = (hi - lo) / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || 10 * mag;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    return { lo: Math.min(lo, out[0]), hi: Math.max(hi, out[out.length - 1]), values: out, step };
  }

  // Round values on a log axis covering [lo, hi] (log10 units): 1-2-3-5 per decade, fewer when they crowd.
  static logTicks(lo, hi, count) {
    for (const ms of [[1, 2, 3, 5], [1, 2, 5], [1, 3], [1]]) {
      const values = [];
      for (let e = Math.floor(lo) - 1; e <= Math.ceil(hi); e++) {
        for (const m of ms) {
          const v = Math.log10(m) + e;
          if (v >= lo - 1e-9 && v <= hi + 1e-9) values.push(v);
        }
      }
      if (values.length <= count + 2 || ms.length === 1) return { lo, hi, values, step: 0 };
    }
  }

  static label(v, step) {
    const a = Math.abs(v);
    const short = x => x.toPrecision(3).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");  // 100.0 -> 100, 1.50 -> 1.5
    if (a >= 1e9) return short(v / 1e9) + "B";
    if (a >= 1e6) return short(v / 1e6) + "M";
    if (a >= 1e3) return short(v / 1e3) + "k";
    if (step === 0) return short(v);
    if (a !== 0 && a < 1e-3) return v.toExponential(1);
    const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step || 1) + 1e-9)));
    return v.toFixed(decimals);
  }

  draw() {
    const canvas = this.canvas;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    const dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const css = getComputedStyle(document.documentElement);
    const muted = css.getPropertyValue("--muted").trim(), grid = css.getPropertyValue("--grid").trim();
    const text = css.getPropertyValue("--text").trim();
    ctx.font = "11px " + css.getPropertyValue("--sans");

    const log = this.options.log;
    const ty = y => (log ? Math.log10(y) : y);
    const pts = this.series.flatMap(s => s.points).filter(p => Number.isFinite(p[1]) && (!log || p[1] > 0));
    if (!pts.length) {
      ctx.fillStyle = muted;
      ctx.textAlign = "center";
      ctx.fillText("no data yet", w / 2, h / 2);
      this.readout.classList.add("hidden");
      return;
    }
    // loops, not Math.min(...): a long run has more points than a call takes arguments
    let xlo = Infinity, xhi = -Infinity, ylo = Infinity, yhi = -Infinity;
    for (const p of pts) {
      const y = ty(p[1]);
      if (p[0] < xlo) xlo = p[0];
      if (p[0] > xhi) xhi = p[0];
      if (y < ylo) ylo = y;
      if (y > yhi) yhi = y;
    }
    const pad = (yhi - ylo) * 0.05;
    const yt = log ? LineChart.logTicks(ylo - pad, yhi + pad, Math.max(3, Math.floor(h / 45)))
      : LineChart.ticks(ylo - pad, yhi + pad, Math.max(3, Math.floor(h / 45)));
    const xt = LineChart.ticks(xlo, xhi, Math.max(3, Math.floor(w / 90)));
    ylo = yt.lo; yhi = yt.hi; xlo = xt.lo; xhi = xt.hi;
    const ylabels = yt.values.map(v => log ? LineChart.label(Math.pow(10, v), 0) : LineChart.label(v, yt.step));
    const left = 10 + Math.max(...ylabels.map(l => ctx.measureText(l).width)), right = 12, top = 8, bottom = 34;
    const X = x => left + (x - xlo) / (xhi - xlo || 1) * (w - left - right);
    const Y = y => top + (1 - (ty(y) - ylo) / (yhi - ylo || 1)) * (h - top - bottom);

    // grid, ticks, axis labels
    ctx.strokeStyle = grid; ctx.lineWidth = 1; ctx.fillStyle = muted;
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    yt.values.forEach((v, i) => {
      const y = top + (1 - (v - ylo) / (yhi - ylo || 1)) * (h - top - bottom);
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w - right, y); ctx.stroke();
      ctx.fillText(ylabels[i], left - 5, y);
    });
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    for (const v of xt.values) {
      const x = X(v);
      ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, h - bottom); ctx.stroke();
      ctx.fillText(LineChart.label(v, xt.step), x, h - bottom + 4);
    }
    ctx.fillText(this.options.x, left + (w - left - right) / 2, h - 14);
    this.titleText.textContent = this.options.title + (log ? " (log scale)" : "");

    // the series
    for (const s of this.series) {
      let points = s.points.filter(p => Number.isFinite(p[1]) && (!log || p[1] > 0));
      // more points than pixels: draw every k-th (and the last), the curve looks the same
      const k = Math.floor(points.length / (2 * w));
      if (k > 1) points = points.filter((p, i) => i % k === 0 || i === points.length - 1);
      ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 1.6;
      ctx.setLineDash(s.dashed ? [5, 4] : []);
      ctx.beginPath();
      points.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
      ctx.stroke();
      ctx.setLineDash([]);
      if (s.markers || points.length === 1) for (const p of points) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 2.6, 0, 7); ctx.fill(); }
    }

    // the readout: every series' point nearest the pointer's x
    if (!this.hover || this.hover.x < left || this.hover.x > w - right) { this.readout.classList.add("hidden"); return; }
    const xv = xlo + (this.hover.x - left) / (w - left - right) * (xhi - xlo);
    const lines = [];
    let at = null;
    for (const s of this.series) {
      let best = null;
      for (const p of s.points) if (Number.isFinite(p[1]) && (!best || Math.abs(p[0] - xv) < Math.abs(best[0] - xv))) best = p;
      if (!best) continue;
      at = at === null || Math.abs(best[0] - xv) < Math.abs(at - xv) ? best[0] : at;
      ctx.fillStyle = s.color; ctx.beginPath(); ctx.arc(X(best[0]), Y(best[1]), 4, 0, 7); ctx.fill();
      lines.push([s, best]);
    }
    if (at !== null) {
      ctx.strokeStyle = muted; ctx.setLineDash([3, 3]);
      ctx.beginPath(); ctx.moveTo(X(at), top); ctx.lineTo(X(at), h - bottom); ctx.stroke(); ctx.setLineDash([]);
    }
    this.readout.replaceChildren(
      gl.el("div", { style: "color:" + text, text: this.options.x + " " + (at === null ? "" : at.toLocaleString()) }),
      ...lines.map(([s, p]) => gl.el("div", {}, gl.el("span", { style: "color:" + s.color, text: "\u25A0 " }),
        `${s.name}: ${gl.fmt(p[1], this.options.digits)}` + (p[0] !== at ? ` (at ${p[0].toLocaleString()})` : ""))));
    this.readout.classList.remove("hidden");
    const box = this.readout;
    const cx = this.canvas.offsetLeft + this.hover.x, cy = this.canvas.offsetTop + this.hover.y;
    box.style.left = (cx + 14 + box.offsetWidth > this.root.clientWidth ? cx - box.offsetWidth - 14 : cx + 14) + "px";
    box.style.top = Math.max(0, cy - box.offsetHeight - 8) + "px";
  }
}
