/* Studies page: the table is rendered by the server; refresh it in place while any study
   is active, so progress moves without a reload. */
"use strict";
(() => {
  const ACTIVE = ["queued", "running", "paused"];
  function active() {
    return [...document.querySelectorAll("#studies .badge")].some((b) => ACTIVE.includes(b.textContent.trim()));
  }
  async function refresh() {
    try {
      const r = await fetch(location.href, { headers: { Accept: "text/html" } });
      if (!r.ok) throw new Error(`${r.status}`);
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      const fresh = doc.getElementById("studies");
      if (fresh) document.getElementById("studies").replaceWith(fresh);
      tsam.banner(null);
    } catch (err) {
      tsam.banner(`Could not refresh the studies (${err.message}); retrying.`, "error");
    }
  }
  setInterval(() => { if (active() || !document.getElementById("studies-table")) refresh(); }, 3000);
})();
