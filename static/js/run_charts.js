// Draws the run page's charts from the JSON that the template embeds with
// json_script (no inline JS). Redrawn after every HTMX swap of the status.
(function () {
  "use strict";
  var charts = {};

  function data(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  function draw(canvasId, config) {
    var canvas = document.getElementById(canvasId);
    if (!canvas || typeof Chart === "undefined") { return; }
    if (charts[canvasId]) { charts[canvasId].destroy(); }
    charts[canvasId] = new Chart(canvas, config);
  }

  function points(pairs) {
    return (pairs || []).map(function (p) { return { x: p[0], y: p[1] }; });
  }

  function render() {
    var progress = data("run-progress-data");
    if (progress && (progress.loss.length || progress.validation.length)) {
      draw("loss-chart", {
        type: "line",
        data: { datasets: [
          { label: "training loss", data: points(progress.loss), yAxisID: "y", borderColor: "#2456c8", pointRadius: 0 },
          { label: "validation nDCG@10", data: points(progress.validation), yAxisID: "y1", borderColor: "#1f7a3f" }
        ] },
        options: { animation: false, parsing: false, scales: {
          x: { type: "linear", title: { display: true, text: "step" } },
          y: { position: "left", title: { display: true, text: "loss" } },
          y1: { position: "right", grid: { drawOnChartArea: false }, title: { display: true, text: "nDCG@10" } }
        } }
      });
    }
    var evaluation = data("run-evaluation-data");
    if (evaluation && evaluation.systems) {
      var names = Object.keys(evaluation.systems);
      var metrics = ["ndcg@10", "mrr@10", "recall@10"];
      var colours = ["#2456c8", "#1f7a3f", "#a15c00"];
      draw("evaluation-chart", {
        type: "bar",
        data: { labels: names, datasets: metrics.map(function (m, i) {
          return { label: m, data: names.map(function (n) { return evaluation.systems[n][m]; }), backgroundColor: colours[i] };
        }) },
        options: { animation: false, scales: { y: { min: 0, max: 1 } } }
      });
    }
  }

  document.addEventListener("DOMContentLoaded", render);
  document.addEventListener("htmx:afterSettle", render);
})();
