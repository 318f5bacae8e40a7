/* The operations dashboard's charts (Chart.js), from the JSON that runs/admin_views.py:chart_data
 * renders into the page. */
(function () {
  "use strict";
  const source = document.getElementById("dashboard-charts");
  if (!source || !window.Chart) return;
  const data = JSON.parse(source.textContent);
  const colors = data.colors;
  const Chart = window.Chart;
  Chart.defaults.font.size = 11;
  Chart.defaults.maintainAspectRatio = false;
  Chart.defaults.animation = false;

  function draw(id, config) {
    const canvas = document.getElementById(id);
    if (canvas) new Chart(canvas, config);
  }

  const finished = data.runs_finished;
  draw("chart-runs-finished", {
    type: "bar",
    data: {
      labels: data.hours,
      datasets: Object.keys(finished).map((status) => ({
        label: status, data: finished[status], backgroundColor: colors[status] || "#888",
      })),
    },
    options: {
      scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } } },
      plugins: { legend: { position: "bottom" } },
    },
  });

  const durations = data.durations;
  const shades = { p50: "#54aeff", p90: "#0969da", p99: "#0a3069" };
  draw("chart-durations", {
    type: "bar",
    data: {
      labels: durations.types,
      datasets: Object.keys(durations.series).map((name) => ({
        label: name, data: durations.series[name], backgroundColor: shades[name] || "#888",
      })),
    },
    options: {
      scales: { y: { beginAtZero: true, title: { display: true, text: "ms" } } },
      plugins: {
        legend: { position: "bottom" },
        tooltip: { callbacks: { afterBody: (items) => "attempts: " + durations.counts[items[0].dataIndex] } },
      },
    },
  });

  draw("chart-queue", {
    type: "bar",
    data: {
      labels: data.queue.statuses,
      datasets: [{
        label: "steps", data: data.queue.counts,
        backgroundColor: data.queue.statuses.map((s) => colors[s] || "#888"),
      }],
    },
    options: {
      indexAxis: "y",
      scales: { x: { beginAtZero: true, ticks: { precision: 0 } } },
      plugins: { legend: { display: false } },
    },
  });

  draw("chart-rates", {
    type: "bar",
    data: {
      labels: data.hours,
      datasets: [
        { label: "failed attempts (retried or died)", data: data.rates.retries, borderColor: colors.retry_wait,
          backgroundColor: colors.retry_wait },
        { label: "steps that went dead", data: data.rates.dead, borderColor: colors.dead,
          backgroundColor: colors.dead },
      ],
    },
    options: {
      scales: { y: { beginAtZero: true, ticks: { precision: 0 } } },
      plugins: { legend: { position: "bottom" } },
    },
  });

  if (data.tokens) {
    draw("chart-tokens", {
      type: "bar",
      data: {
        labels: data.tokens.tenants,
        datasets: [
          { label: "prompt tokens", data: data.tokens.prompt, backgroundColor: "#54aeff" },
          { label: "completion tokens", data: data.tokens.completion, backgroundColor: "#0969da" },
        ],
      },
      options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } },
    });
  }
  document.body.dataset.chartsDrawn = "1";
})();
