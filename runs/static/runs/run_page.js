/* The run page: a Gantt chart of the run's attempts (Chart.js floating horizontal bars) and live
 * updates of the graph and the chart, polling the admin's JSON (RunAdmin.live_view) every ~2 s
 * while the run is active. The graph itself is drawn by the server (runs/admin_graph.py); here
 * only its statuses and counts change. */
(function () {
  "use strict";
  const page = document.getElementById("run-page");
  if (!page) return;
  const liveUrl = page.dataset.liveUrl;
  const pollMs = parseInt(page.dataset.pollMs, 10) || 2000;
  const stepUrl = page.dataset.stepUrl; // ".../step/0/change/": 0 is replaced by a step pk
  const colors = JSON.parse(document.getElementById("run-outcome-colors").textContent);
  let data = JSON.parse(document.getElementById("run-live-data").textContent);
  let chart = null;

  function label(a) { return a.step + " #" + a.number; }

  function timelineConfig(attempts) {
    // a bar of a few ms stays visible: at least 0.4 % of the time span drawn
    const span = Math.max(1, ...attempts.map((a) => a.end));
    const least = Math.max(0.02, span * 0.004);
    return {
      type: "bar",
      data: {
        labels: attempts.map(label),
        datasets: [{
          label: "attempt",
          data: attempts.map((a) => [a.start, Math.max(a.end, a.start + least)]),
          backgroundColor: attempts.map((a) => colors[a.outcome] || "#888"),
          borderRadius: 3,
          barPercentage: 0.8,
          categoryPercentage: 0.9,
        }],
      },
      options: {
        indexAxis: "y",
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        onClick: (_event, elements) => {
          if (!elements.length) return;
          const a = data.timeline.attempts[elements[0].index];
          window.location.href = stepUrl.replace("/0/", "/" + a.step_pk + "/");
        },
        plugins: {
          legend: { display: false },
          tooltip: {
            callbacks: {
              label: (ctx) => {
                const a = data.timeline.attempts[ctx.dataIndex];
                const secs = (a.end - a.start).toFixed(2);
                let text = a.outcome + (a.running ? " (running)" : "") + ", " + secs + " s, starts at " + a.start.toFixed(2) + " s";
                if (a.worker) text += ", " + a.worker;
                return a.error ? [text, a.error] : text;
              },
            },
          },
        },
        scales: {
          x: { type: "linear", min: 0, title: { display: true, text: "seconds since the run was created" } },
          y: { ticks: { autoSkip: false, font: { size: 11 } } },
        },
      },
    };
  }

  function drawTimeline() {
    const attempts = data.timeline.attempts;
    const box = document.getElementById("timeline-box");
    document.getElementById("timeline-empty").hidden = attempts.length > 0;
    box.style.height = Math.max(90, 40 + attempts.length * 22) + "px";
    if (!window.Chart) return;
    if (chart === null) {
      chart = new window.Chart(document.getElementById("run-timeline"), timelineConfig(attempts));
    } else {
      const fresh = timelineConfig(attempts).data;
      chart.data.labels = fresh.labels;
      chart.data.datasets[0].data = fresh.datasets[0].data;
      chart.data.datasets[0].backgroundColor = fresh.datasets[0].backgroundColor;
      chart.update("none");
    }
  }

  function svgEl(name, attrs, text) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function updateGraph() {
    for (const step of data.steps) {
      const node = document.querySelector('.dag-node[data-step="' + CSS.escape(step.id) + '"]');
      if (!node) continue;
      node.setAttribute("class", "dag-node status-" + step.status);
      node.dataset.status = step.status;
      node.querySelector(".dag-state").textContent = " · " + step.status;
      node.querySelector(".dag-attempts").textContent = step.attempts > 1 ? " · try " + step.attempts : "";
      node.querySelector("title").textContent = step.id + " (" + step.type + "): " + step.status + (step.error ? " - " + step.error : "");
      const items = node.querySelector(".dag-items");
      items.replaceChildren();
      if (step.items) {
        for (const [status, n] of Object.entries(step.items)) {
          items.appendChild(svgEl("tspan", { class: "dag-count c-" + status, "data-status": status }, " " + n));
        }
      }
    }
    const badge = document.getElementById("run-live-status");
    badge.textContent = data.run.status;
    badge.dataset.status = data.run.status;
  }

  async function poll() {
    try {
      const response = await fetch(liveUrl, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.ok) {
        data = await response.json();
        updateGraph();
        drawTimeline();
      }
    } catch (_err) {
      /* the server restarts or the network blinks: try again at the next tick */
    }
    if (!data.run.finished) window.setTimeout(poll, pollMs);
    else window.location.reload(); // the run's fields, steps and traces below: read once, at its end
  }

  drawTimeline();
  if (!data.run.finished) window.setTimeout(poll, pollMs);
  else document.body.dataset.runFinished = "1";
})();
