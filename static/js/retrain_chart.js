// Draws the retraining page's chart (production nDCG@10 after each retrain) from the JSON the
// template embeds with json_script (no inline JS). Redrawn after every HTMX swap of the history.
(function () {
  "use strict";
  var chart = null;
  var colours = { promoted: "#1f7a3f", kept: "#2456c8", skipped: "#8a94a6", busy: "#8a94a6" };

  function render() {
    var el = document.getElementById("retrain-chart-data");
    var canvas = document.getElementById("retrain-chart");
    if (!el || !canvas || typeof Chart === "undefined") { return; }
    var points = JSON.parse(el.textContent);
    if (chart) { chart.destroy(); }
    chart = new Chart(canvas, {
      type: "line",
      data: {
        labels: points.map(function (p) { return p.label; }),
        datasets: [{
          label: "production model, held-out nDCG@10",
          data: points.map(function (p) { return p.ndcg; }),
          borderColor: "#2456c8",
          pointBackgroundColor: points.map(function (p) { return colours[p.outcome] || "#2456c8"; }),
          pointRadius: 4,
          stepped: false
        }]
      },
      options: {
        animation: false,
        plugins: { tooltip: { callbacks: { afterLabel: function (item) { return points[item.dataIndex].outcome; } } } },
        scales: { y: { title: { display: true, text: "nDCG@10" } } }
      }
    });
  }

  document.addEventListener("DOMContentLoaded", render);
  document.addEventListener("htmx:afterSettle", render);
})();
