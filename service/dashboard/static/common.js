/* Shared helpers of the dashboard pages: fetching the API, formatting, chart states. */
"use strict";
const tsam = (() => {
  const MAX_POINTS = 2000;

  async function api(path) {
    const r = await fetch(path, { headers: { Accept: "application/json" } });
    if (!r.ok) throw new Error(`${r.status} ${r.statusText} for ${path}`);
    return r.json();
  }

  function fmt(v) {
    if (v === null || v === undefined) return "—";
    if (typeof v === "number") {
      if (!isFinite(v)) return String(v);
      if (Number.isInteger(v)) return String(v);
      return Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 ? v.toExponential(3) : String(+v.toPrecision(4));
    }
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  function seconds(a, b) {
    if (!a || !b) return null;
    return (Date.parse(b) - Date.parse(a)) / 1000;
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  /* The state line above a chart: kind "loading" | "empty" | "error"; null hides it. */
  function chartState(key, text, kind) {
    const state = document.getElementById(`${key}-state`);
    const chart = document.getElementById(key);
    if (text === null) {
      state.hidden = true;
      chart.classList.remove("hidden");
      return;
    }
    state.hidden = false;
    state.className = `state ${kind || "empty"}`;
    state.textContent = text;
    if (kind !== "error" || !chart.data) chart.classList.add("hidden");
  }

  function plot(key, data, layout) {
    chartState(key, null);
    const base = {
      margin: { l: 60, r: 20, t: 10, b: 50 }, hovermode: "closest",
      legend: { orientation: "h", y: -0.2 }, font: { size: 11 },
    };
    return Plotly.react(key, data, Object.assign(base, layout || {}),
      { displaylogo: false, responsive: true });
  }

  /* Every k-th item so at most `max` remain, keeping the last. */
  function downsample(items, max) {
    max = max || MAX_POINTS;
    if (items.length <= max) return items;
    const step = items.length / max;
    const out = [];
    for (let i = 0; i < max; i++) out.push(items[Math.floor(i * step)]);
    if (out[out.length - 1] !== items[items.length - 1]) out[out.length - 1] = items[items.length - 1];
    return out;
  }

  function banner(text, kind) {
    const b = document.getElementById("banner");
    if (!text) { b.hidden = true; return; }
    b.hidden = false;
    b.className = `banner ${kind || ""}`;
    b.textContent = text;
  }

  function live(mode) {
    const l = document.getElementById("live");
    l.hidden = !mode;
    l.className = `live ${mode === "live" ? "on" : mode === "polling" ? "poll" : ""}`;
    l.textContent = { live: "● live", polling: "● polling", done: "finished" }[mode] || "";
  }

  function pageData(id) {
    return JSON.parse(document.getElementById(id || "page-data").textContent);
  }

  return { api, fmt, seconds, el, chartState, plot, downsample, banner, live, pageData, MAX_POINTS };
})();
