// kaiju-tasks dashboard: follow /stream (server-sent events) and swap in the page's live part.
// Pages work without this script; it only keeps them current without a reload.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var status = document.getElementById("live-status");
  var scope = document.body.getAttribute("data-live-scope");
  if (!live || !status || scope === "none" || !window.EventSource) { return; }

  var pending = null, running = false, again = false, last = 0;
  var MIN_GAP = 1000; // ms between two refreshes while events keep coming

  function say(text, on) {
    status.textContent = text;
    status.className = "live " + (on ? "on" : "off");
  }

  function partialUrl() {
    var url = new URL(window.location.href);
    url.searchParams.set("partial", "1");
    return url.toString();
  }

  function refresh() {
    pending = null;
    if (running) { again = true; return; }
    running = true;
    last = Date.now();
    fetch(partialUrl(), { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.status === 401) { window.location.reload(); return null; }
        return response.ok || response.status === 400 ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined) {
          live.innerHTML = html;
          var time = new Date().toISOString().substring(11, 19);
          say("live · updated " + time + " UTC", true);
          document.dispatchEvent(new CustomEvent("kaiju:refreshed"));
        }
      })
      .catch(function () { say("live · refresh failed", false); })
      .then(function () {
        running = false;
        if (again) { again = false; schedule(); }
      });
  }

  function schedule() {
    if (pending !== null) { return; }
    var wait = Math.max(150, MIN_GAP - (Date.now() - last));
    pending = window.setTimeout(refresh, wait);
  }

  function relevant(event) {
    if (event.type === "change" || scope === "all") { return true; }
    var isWorker = (event.type || "").indexOf("worker-") === 0;
    if (scope === "workers") {
      return isWorker || event.type === "task-started" || event.type === "task-succeeded" ||
        event.type === "task-failed" || event.type === "task-waiting";
    }
    if (scope === "task") {
      var marker = live.querySelector("[data-tree]");
      var ids = marker ? (marker.getAttribute("data-tree") + " " + marker.getAttribute("data-task")).split(" ") : [];
      return !isWorker && ids.indexOf(event.task_id) >= 0;
    }
    return !isWorker || event.type === "worker-offline";
  }

  var source = new EventSource("/stream");
  source.addEventListener("open", function () {
    say("live", true);
    schedule(); // whatever changed between rendering this page and connecting
  });
  source.addEventListener("error", function () { say("live · reconnecting", false); });
  source.addEventListener("change", function (message) {
    var event;
    try { event = JSON.parse(message.data); } catch (e) { return; }
    if (relevant(event)) { schedule(); }
  });
  window.addEventListener("beforeunload", function () { source.close(); });
})();
