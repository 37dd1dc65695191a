// kairoi-trio dashboard: the live events page (MIT, part of kairoi-trio). No framework.
// Reads /events/stream (the API's Server-Sent Events, authenticated by the cookie),
// filters by prefix (server side: a new stream) and change (here), pauses and resumes.
"use strict";
(function () {
  const list = document.getElementById("events");
  if (!list) return;
  const MAX_SHOWN = 200;   // items kept in the list
  const MAX_HELD = 1000;   // changes held while paused (older ones dropped, counted)
  const state = document.getElementById("event-state");
  const form = document.getElementById("event-filters");
  const prefixInput = document.getElementById("event-prefix");
  const statusSelect = document.getElementById("event-status");
  const pauseButton = document.getElementById("pause");
  let source = null, paused = false, held = [], dropped = 0;

  function say(text) { state.textContent = text; }

  function show(change) {
    const item = document.createElement("li");
    item.dataset.type = change.type;
    item.dataset.id = change.job.id;
    const when = document.createElement("time");
    when.dateTime = change.at;
    when.textContent = change.at.replace("T", " ").replace(/\.\d+Z$/, "Z");
    const link = document.createElement("a");
    link.href = "/job?id=" + encodeURIComponent(change.job.id);
    link.textContent = change.job.id;   // textContent: ids are never read as HTML
    const what = document.createElement("span");
    what.className = "status " + change.type;
    what.textContent = change.type;
    item.append(when, what, " ", link);
    list.prepend(item);
    while (list.children.length > MAX_SHOWN) list.lastElementChild.remove();
  }

  function wanted(change) {
    return !statusSelect.value || statusSelect.value === change.type;
  }

  function receive(message) {
    let change;
    try { change = JSON.parse(message.data); } catch (e) { return; }
    if (!change.job || !wanted(change)) return;
    if (paused) {
      held.push(change);
      if (held.length > MAX_HELD) { held.shift(); dropped++; }
      say("Paused: " + held.length + " change(s) held" + (dropped ? ", " + dropped + " dropped" : "") + ".");
    } else {
      show(change);
    }
  }

  function connect() {
    if (source) source.close();
    const prefix = prefixInput.value;
    source = new EventSource("/events/stream?prefix=" + encodeURIComponent(prefix));
    say("Connecting…");
    source.addEventListener("ready", function () {
      say("Watching jobs" + (prefix ? " starting with “" + prefix + "”" : "") + ".");
      list.dataset.ready = "true";
    });
    for (const type of ["planned", "triggered", "executed", "failed", "deleted"]) {
      source.addEventListener(type, receive);
    }
    source.addEventListener("error", function () {
      list.dataset.ready = "false";
      say("Disconnected; reconnecting…");
    });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    const url = new URL(window.location.href);
    url.searchParams.set("prefix", prefixInput.value);
    window.history.replaceState(null, "", url);
    list.textContent = "";
    connect();
  });
  statusSelect.addEventListener("change", function () {
    for (const item of Array.from(list.children)) {
      item.hidden = !!statusSelect.value && item.dataset.type !== statusSelect.value;
    }
  });
  pauseButton.addEventListener("click", function () {
    paused = !paused;
    pauseButton.setAttribute("aria-pressed", String(paused));
    pauseButton.textContent = paused ? "Resume" : "Pause";
    if (paused) {
      say("Paused.");
    } else {
      for (const change of held) show(change);
      held = []; dropped = 0;
      say("Watching.");
    }
  });
  connect();
})();
