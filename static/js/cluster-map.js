// Draws a clustering run's 2-D map with the vendored Chart.js (no inline JS):
// one scatter dataset per cluster, outliers grey; hover shows the ticket,
// a click opens the point's cluster. The points come from the run's map.json.
(function () {
  "use strict";

  function colour(number, alpha) {
    // Golden-angle hues: neighbouring cluster numbers get far-apart colours.
    var hue = (number * 137.508) % 360;
    return "hsla(" + hue.toFixed(1) + ", 68%, 45%, " + alpha + ")";
  }

  function paintSwatches() {
    var swatches = document.querySelectorAll(".swatch[data-cluster]");
    for (var i = 0; i < swatches.length; i++) {
      swatches[i].style.backgroundColor = colour(Number(swatches[i].getAttribute("data-cluster")), 1);
    }
  }

  function draw(canvas, data) {
    var byNumber = {};
    var datasets = [];
    data.clusters.forEach(function (c) {
      byNumber[c.number] = { label: c.label, data: [], id: c.id, backgroundColor: colour(c.number, 0.55),
                             pointRadius: 2, pointHoverRadius: 5, borderWidth: 0 };
      datasets.push(byNumber[c.number]);
    });
    var outliers = { label: "outliers", data: [], id: null, backgroundColor: "rgba(140,140,140,0.35)",
                     pointRadius: 1.5, pointHoverRadius: 4, borderWidth: 0 };
    data.points.forEach(function (p) {
      var target = p[2] >= 0 ? byNumber[p[2]] : outliers;
      if (target) { target.data.push({ x: p[0], y: p[1], key: p[3], title: p[4] }); }
    });
    if (outliers.data.length) { datasets.unshift(outliers); }
    var clusterUrl = canvas.getAttribute("data-cluster-url");
    return new Chart(canvas, {
      type: "scatter",
      data: { datasets: datasets },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: { x: { display: false }, y: { display: false } },
        plugins: {
          legend: { display: datasets.length <= 30, position: "right",
                    labels: { boxWidth: 10, font: { size: 11 } } },
          tooltip: { callbacks: { label: function (ctx) {
            var p = ctx.raw;
            return p.key + ": " + p.title + " [" + ctx.dataset.label + "]";
          } } }
        },
        onClick: function (event, elements, chart) {
          if (!elements.length) { return; }
          var dataset = chart.data.datasets[elements[0].datasetIndex];
          if (dataset.id !== null) { window.location.href = clusterUrl.replace("/0/", "/" + dataset.id + "/"); }
        }
      }
    });
  }

  function start() {
    paintSwatches();
    var canvas = document.getElementById("cluster-map");
    if (!canvas || typeof Chart === "undefined") { return; }
    fetch(canvas.getAttribute("data-url"), { credentials: "same-origin" })
      .then(function (response) { return response.json(); })
      .then(function (data) { draw(canvas, data); canvas.setAttribute("data-drawn", String(data.points.length)); });
  }

  document.addEventListener("DOMContentLoaded", start);
})();
