/* Study page: charts and the trial table from the JSON API, kept live by the study's
   server-sent events, with polling (/trials?after=) while the stream is down. */
"use strict";
(() => {
  const P = tsam.pageData();
  const BASE = `/api/v1/studies/${P.study_id}`;
  const FINISHED = ["complete", "pruned", "failed", "cancelled"];
  const STUDY_DONE = ["completed", "cancelled", "failed"];
  const OBJ = P.objectives;
  const MULTI = OBJ.length > 1;
  const MAXIMIZE = OBJ[0].direction === "maximize";
  const SEARCHED = P.searched;
  const ROWS_PER_PAGE = 100;
  const COLORS = { complete: "#3563e9", pruned: "#d97706", running: "#16a34a", failed: "#c62828", cancelled: "#9ca3af" };

  const trials = new Map();   // number -> trial item of the API
  const curves = new Map();   // number -> [[epoch, value], ...] of the first objective
  const dirty = new Set();
  let status = P.status;
  let front = [];
  let sort = { key: "number", desc: true };
  let page = 0;
  let source = null;
  let pollTimer = null;
  let renderTimer = null;
  let importanceStale = true;

  // ------------------------------------------------------------------ data
  async function fetchTrials(after) {
    let cursor = after;
    for (;;) {
      const q = cursor === null ? "" : `&after=${cursor}`;
      const body = await tsam.api(`${BASE}/trials?limit=1000${q}`);
      for (const t of body.items) trials.set(t.number, t);
      if (body.next_after === null) return;
      cursor = body.next_after;
    }
  }

  async function fetchCurves(after) {
    let cursor = after;
    for (;;) {
      const q = cursor === null ? "" : `&after=${cursor}`;
      const body = await tsam.api(`${BASE}/curves?limit=1000${q}`);
      for (const c of body.items) curves.set(c.number, c.points);
      if (body.next_after === null) return;
      cursor = body.next_after;
    }
  }

  /* Everything that may have changed: from the lowest unfinished trial on (new ones too). */
  function catchUpFrom() {
    let lowest = null;
    let highest = -1;
    for (const t of trials.values()) {
      highest = Math.max(highest, t.number);
      if (!FINISHED.includes(t.state) && (lowest === null || t.number < lowest)) lowest = t.number;
    }
    return lowest === null ? highest : lowest - 1;
  }

  async function catchUp() {
    const after = catchUpFrom();
    await fetchTrials(after);
    await fetchCurves(after);
    await refreshSummary();
    scheduleRender(true);
  }

  async function refreshDirty() {
    if (!dirty.size) return;
    const numbers = [...dirty];
    dirty.clear();
    try {
      if (numbers.length > 20) {
        await catchUp();
        return;
      }
      const metric = OBJ[0].metric;
      await Promise.all(numbers.map(async (n) => {
        const t = await tsam.api(`${BASE}/trials/${n}`);
        const { intermediate, error, env, ...item } = t;
        const before = trials.get(n);
        trials.set(n, item);
        curves.set(n, intermediate.filter((r) => typeof r[metric] === "number").map((r) => [r.epoch, r[metric]]));
        if (FINISHED.includes(item.state) && !(before && FINISHED.includes(before.state))) importanceStale = true;
      }));
      if (importanceStale) await refreshSummary();
      scheduleRender(importanceStale);
    } catch (err) {
      for (const n of numbers) dirty.add(n);
      tsam.banner(`Could not read the latest trials (${err.message}); retrying.`, "error");
    }
  }

  async function refreshSummary() {
    const s = await tsam.api(BASE);
    status = s.status;
    front = s.best_trials.map((t) => t.number);
    const badge = document.getElementById("study-status");
    badge.textContent = s.status;
    badge.className = `badge ${s.status}`;
    const done = FINISHED.reduce((a, k) => a + (s.counts[k] || 0), 0);
    const running = s.counts.running || 0;
    document.getElementById("study-progress").textContent =
      `${done}/${s.spec.budget.n_trials} done${running ? ` · ${running} running` : ""}`;
    const counts = Object.keys(s.counts).sort().map((k) => `${k} ${s.counts[k]}`);
    document.getElementById("study-counts").textContent = counts.length ? counts.join(" · ") : "none yet";
    const best = document.getElementById("study-best");
    best.replaceChildren();
    if (MULTI) {
      if (!s.best_trials.length) best.append(tsam.el("span", { class: "muted" }, "No complete trial yet."));
      else {
        best.append(tsam.el("strong", {}, "Pareto front: "));
        s.best_trials.forEach((t, i) => {
          if (i) best.append(", ");
          best.append(tsam.el("a", { href: `/studies/${P.study_id}/trials/${t.number}` }, `#${t.number}`));
        });
      }
    } else if (s.best_trial) {
      const b = s.best_trial;
      best.append(tsam.el("strong", {}, "Best trial ",
        tsam.el("a", { href: `/studies/${P.study_id}/trials/${b.number}` }, `#${b.number}`), ": "),
        `${tsam.fmt(b.value)} `);
      const params = tsam.el("span", { class: "params" });
      for (const k of Object.keys(b.params).sort()) params.append(tsam.el("code", {}, `${k}=${tsam.fmt(b.params[k])}`), " ");
      best.append(params);
    } else best.append(tsam.el("span", { class: "muted" }, "No complete trial yet."));
    tsam.banner(null);
    // A verb (cancel) can end the study without a study event reaching this page.
    if (STUDY_DONE.includes(status) && (source || pollTimer)) stopLive();
  }

  // ------------------------------------------------------------------ charts
  const byNumber = () => [...trials.values()].sort((a, b) => a.number - b.number);
  const complete = () => byNumber().filter((t) => t.state === "complete" && t.value !== null);
  const objValue = (t, i) => (t.values && t.values.length > i ? t.values[i] : i === 0 ? t.value : null);
  const isLog = (k) => !!(P.search_space[k] && P.search_space[k].log);
  const methodOf = (t) => (t.params.method !== undefined ? t.params.method : P.optimizer.method);

  function renderHistory() {
    const key = "chart-history";
    const done = complete();
    if (!done.length) return tsam.chartState(key, trials.size ? "No complete trial yet." : "No trials yet.");
    const data = [];
    if (MULTI) {
      OBJ.forEach((o, i) => {
        const pts = tsam.downsample(done);
        data.push({ type: "scattergl", mode: "markers", name: o.metric, x: pts.map((t) => t.number),
          y: pts.map((t) => objValue(t, i)), yaxis: i ? "y2" : "y" });
      });
    } else {
      const best = [];
      let cur = null;
      for (const t of done) {
        if (cur === null || (MAXIMIZE ? t.value > cur : t.value < cur)) cur = t.value;
        best.push([t.number, cur]);
      }
      const pts = tsam.downsample(done);
      // The best-so-far line only needs its steps (and its end).
      const steps = best.filter((p, i) => i === 0 || i === best.length - 1 || p[1] !== best[i - 1][1]);
      data.push({ type: "scattergl", mode: "markers", name: OBJ[0].metric, marker: { color: COLORS.complete, size: 6 },
        x: pts.map((t) => t.number), y: pts.map((t) => t.value), customdata: pts.map((t) => t.number),
        hovertemplate: "trial %{x}<br>%{y:.4g}<extra></extra>" });
      data.push({ type: "scatter", mode: "lines", name: "best so far", line: { shape: "hv", color: "#c62828" },
        x: steps.map((p) => p[0]), y: steps.map((p) => p[1]) });
    }
    tsam.plot(key, data, {
      xaxis: { title: { text: "trial" } }, yaxis: { title: { text: OBJ[0].metric } },
      ...(MULTI ? { yaxis2: { title: { text: OBJ[1].metric }, overlaying: "y", side: "right" } } : {}),
    });
  }

  function renderIntermediate() {
    const key = "chart-intermediate";
    let numbers = [...curves.keys()].filter((n) => (curves.get(n) || []).length).sort((a, b) => a - b);
    if (!numbers.length) return tsam.chartState(key, trials.size ? "No intermediate values yet." : "No trials yet.");
    const total = numbers.reduce((a, n) => a + curves.get(n).length, 0);
    if (total > tsam.MAX_POINTS) {
      const perTrial = total / numbers.length;
      numbers = tsam.downsample(numbers, Math.max(1, Math.floor(tsam.MAX_POINTS / perTrial)));
    }
    const groups = {};
    const cuts = { x: [], y: [], text: [] };
    for (const n of numbers) {
      const state = (trials.get(n) || { state: "running" }).state;
      const g = groups[state] || (groups[state] = { x: [], y: [], text: [] });
      const pts = curves.get(n);
      for (const [e, v] of pts) { g.x.push(e); g.y.push(v); g.text.push(`trial ${n}`); }
      g.x.push(null); g.y.push(null); g.text.push("");
      if (state === "pruned") {
        const [e, v] = pts[pts.length - 1];
        cuts.x.push(e); cuts.y.push(v); cuts.text.push(`trial ${n} pruned`);
      }
    }
    const data = Object.entries(groups).map(([state, g]) => ({
      type: "scatter", mode: "lines+markers", name: state, x: g.x, y: g.y, text: g.text,
      connectgaps: false, line: { color: COLORS[state] || "#888", width: 1, dash: state === "pruned" ? "dot" : "solid" },
      marker: { size: 3 }, opacity: state === "complete" ? 0.7 : 0.9, hovertemplate: "%{text}<br>epoch %{x}: %{y:.4g}<extra></extra>",
    }));
    if (cuts.x.length) data.push({ type: "scatter", mode: "markers", name: "pruned here", x: cuts.x, y: cuts.y, text: cuts.text,
      marker: { symbol: "x", size: 10, color: COLORS.pruned }, hovertemplate: "%{text} at epoch %{x}<extra></extra>" });
    tsam.plot(key, data, { xaxis: { title: { text: "epoch" } }, yaxis: { title: { text: OBJ[0].metric } } });
  }

  function dimension(k, rows) {
    const spec = P.search_space[k];
    if (spec.type === "categorical") {
      const choices = spec.choices.map(String);
      return { label: k, values: rows.map((t) => choices.indexOf(String(t.params[k]))),
        tickvals: choices.map((_, i) => i), ticktext: choices };
    }
    if (spec.log) return { label: `log10(${k})`, values: rows.map((t) => Math.log10(Number(t.params[k]))) };
    return { label: k, values: rows.map((t) => Number(t.params[k])) };
  }

  function renderParallel() {
    const key = "chart-parallel";
    if (!SEARCHED.length) return tsam.chartState(key, "The study searches no parameters.");
    const done = complete();
    if (!done.length) return tsam.chartState(key, trials.size ? "No complete trial yet." : "No trials yet.");
    // Conditional parameters (t of an ERM trial) are missing in some trials: show the ones
    // every complete trial has.
    const params = SEARCHED.filter((k) => done.every((t) => t.params[k] !== undefined));
    if (!params.length) return tsam.chartState(key, "No parameter is set in every complete trial.");
    const rows = tsam.downsample(done);
    const dims = params.map((k) => dimension(k, rows));
    OBJ.forEach((o, i) => dims.push({ label: o.metric, values: rows.map((t) => objValue(t, i)) }));
    tsam.plot(key, [{ type: "parcoords", dimensions: dims,
      line: { color: rows.map((t) => objValue(t, 0)), colorscale: "Viridis", showscale: true,
        reversescale: !MAXIMIZE, colorbar: { title: { text: OBJ[0].metric } } } }],
    { margin: { l: 60, r: 60, t: 40, b: 20 } });
  }

  function renderSlice() {
    const key = "chart-slice";
    const first = ["t", "rho", "samples"].filter((k) => SEARCHED.includes(k));
    const keys = (first.length ? first : SEARCHED).slice(0, 6);
    if (!keys.length) return tsam.chartState(key, "The study searches no parameters.");
    const done = complete();
    if (!done.length) return tsam.chartState(key, trials.size ? "No complete trial yet." : "No trials yet.");
    const layout = { grid: { rows: 1, columns: keys.length, pattern: "independent" }, showlegend: false };
    const data = keys.map((k, i) => {
      const rows = tsam.downsample(done.filter((t) => t.params[k] !== undefined && t.params[k] !== "inf"));
      const ax = i ? String(i + 1) : "";
      layout[`xaxis${ax}`] = { title: { text: k }, type: isLog(k) ? "log" : undefined };
      layout[`yaxis${ax}`] = i ? {} : { title: { text: OBJ[0].metric } };
      return { type: "scatter", mode: "markers", name: k, xaxis: `x${ax}`, yaxis: `y${ax}`,
        x: rows.map((t) => t.params[k]), y: rows.map((t) => objValue(t, 0)),
        marker: { color: rows.map((t) => t.number), colorscale: "Blues", size: 6, showscale: i === keys.length - 1,
          colorbar: { title: { text: "trial" } } },
        text: rows.map((t) => `trial ${t.number}`), hovertemplate: `%{text}<br>${k}=%{x}<br>%{y:.4g}<extra></extra>` };
    });
    tsam.plot(key, data, layout);
  }

  async function renderImportance() {
    const key = "chart-importance";
    if (!SEARCHED.length) return tsam.chartState(key, "The study searches no parameters.");
    const evaluator = document.getElementById("importance-evaluator").value;
    try {
      const body = await tsam.api(`${BASE}/importance?evaluator=${evaluator}`);
      importanceStale = false;
      const entries = Object.entries(body.importances).sort((a, b) => a[1] - b[1]);
      if (!entries.length) return tsam.chartState(key, body.message ? `No importances yet: ${body.message}.` : "No importances yet.");
      tsam.plot(key, [{ type: "bar", orientation: "h", x: entries.map((e) => e[1]), y: entries.map((e) => e[0]),
        marker: { color: COLORS.complete }, hovertemplate: "%{y}: %{x:.3f}<extra></extra>" }],
      { xaxis: { title: { text: `importance for ${body.objective} (${body.n_trials} trials)` } }, margin: { l: 100, r: 20, t: 10, b: 50 } });
    } catch (err) {
      tsam.chartState(key, `Could not compute importances: ${err.message}`, "error");
    }
  }

  function renderPareto() {
    const key = "chart-pareto";
    if (!MULTI) return tsam.chartState(key, "Single-objective study: no Pareto front.");
    const done = complete().filter((t) => objValue(t, 1) !== null);
    if (!done.length) return tsam.chartState(key, trials.size ? "No complete trial yet." : "No trials yet.");
    const onFront = new Set(front);
    const rest = tsam.downsample(done.filter((t) => !onFront.has(t.number)));
    const best = done.filter((t) => onFront.has(t.number)).sort((a, b) => objValue(a, 0) - objValue(b, 0));
    const trace = (rows, name, marker, mode) => ({ type: "scatter", mode, name, marker,
      x: rows.map((t) => objValue(t, 0)), y: rows.map((t) => objValue(t, 1)), text: rows.map((t) => `trial ${t.number}`),
      hovertemplate: "%{text}<br>%{x:.4g}, %{y:.4g}<extra></extra>" });
    tsam.plot(key, [trace(rest, "trials", { color: "#9ca3af", size: 7 }, "markers"),
      trace(best, "Pareto front", { color: "#c62828", size: 9 }, "lines+markers")],
    { xaxis: { title: { text: `${OBJ[0].metric} (${OBJ[0].direction})` } }, yaxis: { title: { text: `${OBJ[1].metric} (${OBJ[1].direction})` } } });
  }

  function renderFlatness() {
    const key = "chart-flatness";
    const done = complete().filter((t) => t.metrics && typeof t.metrics.sharpness === "number");
    if (!done.length) return tsam.chartState(key, complete().length ? "No complete trial reported sharpness." : trials.size ? "No complete trial yet." : "No trials yet.");
    const accName = done.some((t) => typeof t.metrics.test_accuracy === "number") ? "test_accuracy" : "val_accuracy";
    const tOf = (t) => Number(t.params.t !== undefined ? t.params.t : P.optimizer.t);
    const tsamRows = done.filter((t) => methodOf(t) === "tsam" && isFinite(tOf(t)));
    const refs = done.filter((t) => !tsamRows.includes(t));
    const data = [];
    const xs = tsamRows.map(tOf);
    const lo = xs.length ? Math.min(...xs) : 0.1;
    const hi = xs.length ? Math.max(...xs) : 100;
    const text = tsamRows.map((t) => `trial ${t.number}`);
    data.push({ type: "scatter", mode: "markers", name: `TSAM ${accName}`, x: xs, y: tsamRows.map((t) => t.metrics[accName]),
      text, marker: { color: COLORS.complete, size: 8 }, hovertemplate: "%{text}<br>t=%{x:.3g}: %{y:.4g}<extra></extra>" });
    data.push({ type: "scatter", mode: "markers", name: "TSAM sharpness", x: xs, y: tsamRows.map((t) => t.metrics.sharpness),
      text, xaxis: "x2", yaxis: "y2", marker: { color: "#d97706", size: 8, symbol: "diamond" },
      hovertemplate: "%{text}<br>t=%{x:.3g}: %{y:.4g}<extra></extra>" });
    const groups = {};
    for (const t of refs) {
      const m = methodOf(t) === "tsam" ? "TSAM t=inf" : methodOf(t).toUpperCase();
      (groups[m] = groups[m] || []).push(t);
    }
    const dash = { SAM: "dash", ERM: "dot" };
    for (const [m, rows] of Object.entries(groups)) {
      const mean = (f) => rows.reduce((a, t) => a + t.metrics[f], 0) / rows.length;
      const nums = rows.map((t) => `#${t.number}`).join(", ");
      data.push({ type: "scatter", mode: "lines", name: `${m} (${nums})`, legendgroup: m, x: [lo, hi], y: [mean(accName), mean(accName)],
        line: { dash: dash[m] || "dashdot", color: m === "ERM" ? "#6b7280" : "#7c3aed" }, hovertemplate: `${m} ${accName} %{y:.4g}<extra></extra>` });
      data.push({ type: "scatter", mode: "lines", name: `${m} sharpness`, legendgroup: m, showlegend: false, x: [lo, hi],
        y: [mean("sharpness"), mean("sharpness")], xaxis: "x2", yaxis: "y2",
        line: { dash: dash[m] || "dashdot", color: m === "ERM" ? "#6b7280" : "#7c3aed" }, hovertemplate: `${m} sharpness %{y:.4g}<extra></extra>` });
    }
    tsam.plot(key, data, {
      grid: { rows: 2, columns: 1, pattern: "independent" },
      xaxis: { type: "log", matches: "x2", showticklabels: false }, xaxis2: { type: "log", title: { text: "t" } },
      yaxis: { title: { text: accName } }, yaxis2: { title: { text: "sharpness" } },
    });
  }

  // ------------------------------------------------------------------ trial table
  function columns() {
    const metrics = ["val_accuracy", "test_accuracy", "sharpness", "tilted_loss"]
      .filter((m) => !OBJ.some((o) => o.metric === m))
      .filter((m) => [...trials.values()].some((t) => t.metrics && typeof t.metrics[m] === "number"));
    const cols = [{ key: "number", label: "#", get: (t) => t.number, num: true },
      { key: "state", label: "state", get: (t) => t.state }];
    for (const k of SEARCHED) cols.push({ key: `p:${k}`, label: k, get: (t) => t.params[k], num: true });
    OBJ.forEach((o, i) => cols.push({ key: `v:${i}`, label: MULTI ? o.metric : `value (${o.metric})`, get: (t) => objValue(t, i), num: true }));
    for (const m of metrics) cols.push({ key: `m:${m}`, label: m, get: (t) => (t.metrics ? t.metrics[m] : null), num: true });
    cols.push({ key: "duration", label: "duration (s)", get: (t) => tsam.seconds(t.started_at, t.finished_at), num: true });
    cols.push({ key: "attempts", label: "attempts", get: (t) => t.attempts, num: true });
    return cols;
  }

  function compare(a, b) {
    if (a === b) return 0;
    if (a === null || a === undefined) return 1;
    if (b === null || b === undefined) return -1;
    return typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b));
  }

  function renderTable() {
    const table = document.getElementById("trial-table");
    const state = document.getElementById("trials-state");
    if (!trials.size) {
      state.hidden = false;
      state.className = "state empty";
      state.textContent = STUDY_DONE.includes(status) ? "The study ended without trials." : "No trials yet: the scheduler starts them as slots free up.";
      table.hidden = true;
      document.getElementById("trial-pager").hidden = true;
      return;
    }
    state.hidden = true;
    table.hidden = false;
    const cols = columns();
    const head = table.tHead.rows[0];
    head.replaceChildren(...cols.map((c) => {
      const th = tsam.el("th", { class: c.num ? "num" : null, "data-key": c.key });
      th.textContent = c.label;
      if (sort.key === c.key) th.setAttribute("aria-sort", sort.desc ? "descending" : "ascending");
      th.addEventListener("click", () => {
        sort = { key: c.key, desc: sort.key === c.key ? !sort.desc : false };
        renderTable();
      });
      return th;
    }));
    const col = cols.find((c) => c.key === sort.key) || cols[0];
    const rows = [...trials.values()].sort((a, b) => {
      const c = compare(col.get(a), col.get(b));
      return (sort.desc ? -c : c) || a.number - b.number;
    });
    const pages = Math.max(1, Math.ceil(rows.length / ROWS_PER_PAGE));
    page = Math.min(page, pages - 1);
    const shown = rows.slice(page * ROWS_PER_PAGE, (page + 1) * ROWS_PER_PAGE);
    table.tBodies[0].replaceChildren(...shown.map((t) => {
      const tr = tsam.el("tr", { class: `state-${t.state}`, "data-number": t.number });
      for (const c of cols) {
        const td = tsam.el("td", { class: c.num ? "num" : null });
        if (c.key === "number") td.append(tsam.el("a", { href: `/studies/${P.study_id}/trials/${t.number}` }, t.number));
        else if (c.key === "state") td.append(tsam.el("span", { class: `badge ${t.state}` }, t.state));
        else td.textContent = tsam.fmt(c.get(t));
        tr.append(td);
      }
      return tr;
    }));
    document.getElementById("trial-pager").hidden = pages === 1;
    document.getElementById("trial-page").textContent = `page ${page + 1} of ${pages}`;
    document.getElementById("trial-table-info").textContent = `${rows.length} trials`;
  }

  // ------------------------------------------------------------------ rendering
  function renderAll(withImportance) {
    for (const f of [renderHistory, renderIntermediate, renderParallel, renderSlice, renderPareto, renderFlatness, renderTable]) {
      try { f(); } catch (err) { console.error(err); }
    }
    if (withImportance || importanceStale) renderImportance();
  }

  function scheduleRender(withImportance) {
    if (withImportance) importanceStale = true;
    if (renderTimer) return;
    renderTimer = setTimeout(() => { renderTimer = null; renderAll(false); }, 250);
  }

  // ------------------------------------------------------------------ live updates
  function startPolling() {
    tsam.live("polling");
    if (pollTimer) return;
    pollTimer = setInterval(async () => {
      try { await catchUp(); } catch (err) { tsam.banner(`Cannot reach the server (${err.message}); retrying.`, "error"); }
      if (STUDY_DONE.includes(status)) stopLive();
    }, 2000);
  }

  function stopLive() {
    if (source) { source.close(); source = null; }
    if (pollTimer) { clearInterval(pollTimer); pollTimer = null; }
    tsam.live("done");
  }

  function connect() {
    source = new EventSource(`${BASE}/events`);
    source.onopen = () => {
      tsam.live("live");
      if (pollTimer) { clearInterval(pollTimer); pollTimer = null; catchUp().catch(() => {}); }
    };
    source.onerror = () => startPolling();  // EventSource reconnects on its own meanwhile
    for (const name of ["trial_started", "trial_report", "trial_finished", "trial_retry"]) {
      source.addEventListener(name, (e) => { dirty.add(JSON.parse(e.data).number); });
    }
    source.addEventListener("study", async () => {
      stopLive();
      // The study's own event can precede its commit: read until it shows finished.
      for (let i = 0; i < 20 && !STUDY_DONE.includes(status); i++) {
        await catchUp().catch(() => {});
        if (!STUDY_DONE.includes(status)) await new Promise((r) => setTimeout(r, 300));
      }
      await catchUp().catch(() => {});
    });
    source.addEventListener("resync", () => {
      source.close();
      startPolling();
      setTimeout(connect, 1000);
    });
  }

  async function start() {
    document.getElementById("trial-prev").addEventListener("click", () => { page = Math.max(0, page - 1); renderTable(); });
    document.getElementById("trial-next").addEventListener("click", () => { page += 1; renderTable(); });
    document.getElementById("importance-evaluator").addEventListener("change", () => renderImportance());
    try {
      await Promise.all([fetchTrials(null), fetchCurves(null), refreshSummary()]);
    } catch (err) {
      tsam.banner(`Could not load the study (${err.message}); retrying.`, "error");
      for (const k of ["history", "intermediate", "parallel", "slice", "importance", "pareto", "flatness"]) {
        tsam.chartState(`chart-${k}`, "Could not load the trials.", "error");
      }
      setTimeout(start, 3000);
      return;
    }
    renderAll(true);
    if (STUDY_DONE.includes(status)) tsam.live("done");
    else {
      connect();
      setInterval(() => { refreshDirty(); }, 500);
      // Safety net: a scheduler in another process sends no events to this one.
      setInterval(() => { if (!STUDY_DONE.includes(status) && !pollTimer) catchUp().catch(() => {}); }, 15000);
    }
  }

  window.addEventListener("resize", () => {
    for (const c of document.querySelectorAll(".chart")) if (c.data) Plotly.Plots.resize(c);
  });
  start();
})();
