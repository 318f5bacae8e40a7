/* The agent task page: live status, progress bar and step rows from the task's event feed
 * (GET /api/v1/chat/orchestrate/{id}/events, tasks_app/events.py), the same feed run_task prints
 * and API clients read. An EventSource reconnects by itself with Last-Event-ID (nothing repeats);
 * at `end` the page is read again once, for the result, checkpoints and traces. */
(function () {
  "use strict";
  const live = document.getElementById("task-live");
  if (!live || live.dataset.finished || !window.EventSource) return;
  const bar = document.getElementById("task-progress");
  const barText = document.getElementById("task-progress-text");
  const badge = document.getElementById("task-status");
  const table = document.getElementById("task-steps");

  function showTask(data) {
    bar.value = data.progress;
    barText.textContent = data.progress + "%";
    if (badge) {
      badge.textContent = data.status;
      badge.dataset.status = data.status;
    }
  }

  function cell(row, name, text) {
    let td = row.querySelector("td." + name);
    if (!td) {
      td = document.createElement("td");
      td.className = name;
      row.appendChild(td);
    }
    td.textContent = text;
  }

  function showStep(step) {
    if (!table) return;
    let row = table.querySelector('tr[data-index="' + step.index + '"]');
    if (!row) {
      row = document.createElement("tr");
      row.dataset.index = step.index;
      const number = document.createElement("td");
      number.textContent = step.index + 1;
      row.appendChild(number);
      table.appendChild(row);
    }
    cell(row, "step-description", step.description || "");
    cell(row, "step-tool", step.tool || "");
    cell(row, "step-status", step.status);
    cell(row, "step-attempts", step.attempts);
    row.dataset.status = step.status;
  }

  const source = new EventSource(live.dataset.eventsUrl, { withCredentials: true });
  source.addEventListener("task", (e) => showTask(JSON.parse(e.data)));
  source.addEventListener("step", (e) => showStep(JSON.parse(e.data)));
  source.addEventListener("end", (e) => {
    source.close();
    showTask(JSON.parse(e.data));
    document.body.dataset.taskFinished = "1";
    window.location.reload(); // the fields that only change at the end: read once
  });
})();
