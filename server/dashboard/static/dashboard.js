// fedseg dashboard: ask the server every few seconds whether the page's run changed, and redraw what did.
// The server answers {"unchanged": true} while nothing changed, else fresh HTML panels and Plotly figures.
(function () {
  "use strict";
  const body = document.body;
  const pollUrl = body.dataset.pollUrl;
  const refreshMs = Number(body.dataset.refreshMs) || 2000;
  let signature = body.dataset.signature || "";
  const plotConfig = { displaylogo: false, responsive: true };

  function drawFigures(figures) {
    const box = document.getElementById("figures");
    if (!box || !figures || typeof Plotly === "undefined") return;
    const wanted = Object.keys(figures);
    const loading = document.getElementById("figures-loading");
    if (loading) loading.remove();
    for (const id of wanted) {
      let div = document.getElementById("figure-" + id);
      if (!div) {
        div = document.createElement("div");
        div.id = "figure-" + id;
        div.className = "figure";
        box.appendChild(div);
      }
      Plotly.react(div, figures[id].data, figures[id].layout, plotConfig);
    }
    for (const div of Array.from(box.querySelectorAll(".figure"))) {
      if (!wanted.includes(div.id.slice("figure-".length))) {
        Plotly.purge(div);
        div.remove();
      }
    }
  }

  function apply(state) {
    for (const [name, html] of Object.entries(state.panels || {})) {
      const section = document.getElementById("panel-" + name);
      if (section) section.innerHTML = html;
    }
    drawFigures(state.figures);
    signature = state.signature;
  }

  function showLive(ok, text) {
    const live = document.getElementById("live");
    if (!live) return;
    live.textContent = text;
    live.className = ok ? "live" : "live live-lost";
  }

  async function poll() {
    try {
      const response = await fetch(pollUrl + "?since=" + encodeURIComponent(signature),
                                   { credentials: "same-origin", cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status + ": " + (await response.text()));
      const state = await response.json();
      if (!state.unchanged) apply(state);
      showLive(true, "live · checked " + new Date().toLocaleTimeString());
    } catch (error) {
      showLive(false, "no connection to the dashboard (" + error.message + "); retrying");
    } finally {
      window.setTimeout(poll, refreshMs);
    }
  }

  if (pollUrl) poll();
})();
