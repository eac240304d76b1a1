/* Trial page: per-epoch curves of every metric; while the trial runs, poll it and redraw. */
"use strict";
(() => {
  const P = tsam.pageData();
  const URL_ = `/api/v1/studies/${P.study_id}/trials/${P.number}`;
  const ACTIVE = ["waiting", "running"];
  const SKIP = new Set(["epoch", "epoch_time", "lr", "t"]);

  function render(rows) {
    const key = "chart-trial-curves";
    if (!rows.length) {
      return tsam.chartState(key, ACTIVE.includes(P.state) ? "No epoch reported yet." : "This trial reported no epochs.");
    }
    const names = [...new Set(rows.flatMap((r) => Object.keys(r)))]
      .filter((k) => !SKIP.has(k) && rows.some((r) => typeof r[k] === "number")).sort();
    const data = names.map((k) => {
      const acc = k.includes("accuracy");
      const pts = rows.filter((r) => typeof r[k] === "number");
      return { type: "scatter", mode: "lines+markers", name: k, x: pts.map((r) => r.epoch), y: pts.map((r) => r[k]),
        xaxis: acc ? "x" : "x2", yaxis: acc ? "y" : "y2", line: { width: k === P.objective ? 3 : 1.5 },
        hovertemplate: `${k}<br>epoch %{x}: %{y:.4g}<extra></extra>` };
    });
    tsam.plot(key, data, {
      grid: { rows: 1, columns: 2, pattern: "independent" },
      xaxis: { title: { text: "epoch" } }, xaxis2: { title: { text: "epoch" } },
      yaxis: { title: { text: "accuracy" } }, yaxis2: { title: { text: "loss / other" } },
      legend: { orientation: "h", y: -0.25 },
    });
  }

  render(tsam.pageData("curve-data"));
  if (ACTIVE.includes(P.state)) {
    tsam.live("polling");
    const timer = setInterval(async () => {
      try {
        const t = await tsam.api(URL_);
        render(t.intermediate);
        const badge = document.getElementById("trial-state");
        badge.textContent = t.state;
        badge.className = `badge ${t.state}`;
        document.getElementById("trial-attempts").textContent = t.attempts;
        tsam.banner(null);
        if (!ACTIVE.includes(t.state)) {
          clearInterval(timer);
          location.reload();  // final metrics, traceback and environment are rendered by the server
        }
      } catch (err) {
        tsam.banner(`Cannot reach the server (${err.message}); retrying.`, "error");
      }
    }, 2000);
  }
})();
