// kaiju-tasks dashboard: follow /stream (server-sent events) and swap in the page's live part.
// Pages work without this script; it only keeps them current without a reload.
(function () {
  "use strict";

  // Set once the page is being left (a form posted, a link followed): a refresh answered 401
  // (the session just ended by "Log out") must not reload this page over the navigation.
  var leaving = false;

  // Confirm destructive actions (forms marked data-confirm).
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form && form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { event.preventDefault(); }
    if (!event.defaultPrevented) { leaving = true; }
  });
  window.addEventListener("beforeunload", function () { leaving = true; });

  var live = document.getElementById("live");
  var status = document.getElementById("live-status");
  var updated = document.getElementById("live-updated");
  var scope = document.body.getAttribute("data-live-scope");
  if (!live || !status || scope === "none" || !window.EventSource) { return; }

  // A page answered to a form post lives at the post's URL: show (and refresh) the task's own.
  // The canonical address is /tasks/<id, every reserved character encoded> or /task?id=<id>;
  // the page's own address may add "?done=...".
  var marker = live.querySelector("[data-canonical]");
  var path = window.location.pathname + window.location.search;
  if (marker && path.indexOf(marker.getAttribute("data-canonical")) !== 0) {
    path = marker.getAttribute("data-canonical");
    window.history.replaceState(null, "", path);
  }

  var pending = null, running = false, again = false, last = 0;
  var MIN_GAP = 1000; // ms between two refreshes while events keep coming

  function say(text, on) {
    // Announced to screen readers: only connection changes, never each refresh.
    if (status.textContent !== text) { status.textContent = text; }
    status.className = "live " + (on ? "on" : "off");
  }

  function partialUrl() {
    var url = new URL(path, window.location.href);
    url.searchParams.set("partial", "1");
    return url.toString();
  }

  function openDetails() {
    var open = [];
    live.querySelectorAll("details").forEach(function (d, i) { if (d.open) { open.push(i); } });
    return open;
  }

  function typed() {
    // What the user has typed into fields of the live part (the message form): kept across swaps.
    var values = {};
    live.querySelectorAll("textarea[id], input[id]").forEach(function (field) {
      if (field.value !== field.defaultValue) { values[field.id] = field.value; }
    });
    return values;
  }

  // A swap between a press and its release would lose the click: the browser sends it to what
  // the two have in common, not to the link pressed. Swaps wait for the release (and the click
  // it makes, which may leave the page).
  var pressed = false, held = null;
  document.addEventListener("pointerdown", function () { pressed = true; }, true);
  function released() {
    pressed = false;
    window.setTimeout(function () {
      if (held !== null && !pressed && !leaving) {
        var html = held;
        held = null;
        document.body.removeAttribute("data-swap-held");
        swap(html);
      }
    }, 0);
  }
  document.addEventListener("pointerup", released, true);
  document.addEventListener("pointercancel", released, true);
  window.addEventListener("blur", released);

  function swap(html) {
    if (pressed) { held = html; document.body.setAttribute("data-swap-held", ""); return; }
    var open = openDetails();
    var values = typed();
    var focused = document.activeElement;
    var inLive = focused && live.contains(focused);
    var focusHref = inLive ? focused.getAttribute("href") : null;
    var focusId = inLive ? focused.id : "";
    live.innerHTML = html;
    var details = live.querySelectorAll("details");
    open.forEach(function (i) { if (details[i]) { details[i].open = true; } });
    Object.keys(values).forEach(function (id) {
      var field = document.getElementById(id);
      if (field && live.contains(field)) { field.value = values[id]; }
    });
    if (focusId) {
      var same = document.getElementById(focusId);
      if (same && live.contains(same)) { same.focus(); }
    } else if (focusHref) {
      var again = live.querySelector('a[href="' + focusHref.replace(/"/g, '\\"') + '"]');
      if (again) { again.focus(); }
    }
    updated.textContent = "updated " + new Date().toISOString().substring(11, 19) + " UTC";
    document.dispatchEvent(new CustomEvent("kaiju:refreshed"));
  }

  function refresh() {
    if (pending !== null) { window.clearTimeout(pending); }
    pending = null;
    if (running) { again = true; return; }
    running = true;
    last = Date.now();
    fetch(partialUrl(), { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) {
        if (response.status === 401) {
          if (!leaving) { window.location.reload(); }
          return null;
        }
        return response.ok || response.status === 400 || response.status === 404
          ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined) { swap(html); }
      })
      .catch(function () { say("live · refresh failed", false); })
      .then(function () {
        running = false;
        if (again) { again = false; schedule(); }
      });
  }

  var trailing = null;
  var SETTLE = 2500; // ms after the last event: one more refresh (the server caches ~2 s)

  function schedule() {
    if (trailing !== null) { window.clearTimeout(trailing); }
    trailing = window.setTimeout(function () { trailing = null; refresh(); }, SETTLE);
    if (pending !== null) { return; }
    var wait = Math.max(150, MIN_GAP - (Date.now() - last));
    pending = window.setTimeout(refresh, wait);
  }

  function relevant(event) {
    if (event.type === "change" || scope === "all" || scope === "workers") { return true; }
    var isWorker = (event.type || "").indexOf("worker-") === 0;
    if (scope === "task") {
      if (isWorker) { return false; }
      if (event.type === "task-sent") { return true; } // perhaps a new task in this tree
      var current = live.querySelector("[data-tree]");
      var ids = current ? (current.getAttribute("data-tree") + " " + current.getAttribute("data-task")).split(" ") : [];
      return ids.indexOf(event.task_id) >= 0;
    }
    return !isWorker || event.type === "worker-offline";
  }

  var source = new EventSource("/stream");
  source.addEventListener("open", function () {
    say("live", true);
    schedule(); // whatever changed between rendering this page and connecting
  });
  source.addEventListener("error", function () {
    if (source.readyState === EventSource.CLOSED) {
      // The server refused the stream: logged out (reload shows the login page) or no live
      // updates on this server (say so, and stay).
      fetch(partialUrl(), { credentials: "same-origin" }).then(function (response) {
        if (response.status === 401 && !leaving) { window.location.reload(); }
      });
      say("live updates off", false);
      return;
    }
    say("live · reconnecting", false);
  });
  source.addEventListener("change", function (message) {
    var event;
    try { event = JSON.parse(message.data); } catch (e) { return; }
    if (relevant(event)) { schedule(); }
  });
  window.addEventListener("beforeunload", function () { source.close(); });
})();
