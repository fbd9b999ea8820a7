// training-worker dashboard: live updates by server-sent events. Everything works without
// this script; it only keeps the page current without a reload.
(function () {
  "use strict";
  var state = document.getElementById("live-state");
  function say(text) { if (state) { state.textContent = text; } }

  // The live region: asked again (only it) when the worker says something changed.
  var live = document.getElementById("live");
  if (live && window.EventSource) {
    var busy = false, again = false;
    var refresh = function () {
      if (busy) { again = true; return; }
      busy = true;
      fetch(location.pathname + location.search, {
        headers: { "x-ui-partial": "1" }, credentials: "same-origin", cache: "no-store"
      }).then(function (r) {
        if (r.status === 401) { location.reload(); return null; }
        return r.ok ? r.text() : null;
      }).then(function (html) {
        if (html === null) { return; }
        // Keep an open confirmation open across a refresh.
        var open = Array.prototype.map.call(live.querySelectorAll("details[open] form"),
          function (f) { return f.getAttribute("action"); });
        live.innerHTML = html;
        open.forEach(function (action) {
          var f = live.querySelector('form[action="' + action + '"]');
          if (f && f.parentElement) { f.parentElement.open = true; }
        });
        document.body.setAttribute("data-refreshed", String(Date.now()));
      }).catch(function () {}).then(function () {
        busy = false;
        if (again) { again = false; refresh(); }
      });
    };
    onChange(refresh);
  }

  // Calls `handler` on every change the worker reports: through the tabs' shared
  // connection where the browser has SharedWorker, else through a stream of this tab's own.
  function onChange(handler) {
    if (window.SharedWorker) {
      try {
        var shared = new SharedWorker("/ui/assets/events.js");
        shared.port.onmessage = function (e) {
          if (e.data === "change") { handler(); } else { say(e.data); }
        };
        shared.port.start();
        return;
      } catch (err) { /* fall back to a stream of this tab's own */ }
    }
    var changes = new EventSource("/ui/events");
    changes.addEventListener("open", function () { say("live"); });
    changes.addEventListener("error", function () { say("reconnecting…"); });
    changes.addEventListener("change", handler);
  }

  // A job's log: new text appended as the trainer prints it. The stream is closed while
  // the tab is hidden (each holds a connection) and resumed from the same offset.
  var log = document.getElementById("log");
  if (log && log.getAttribute("data-follow") && window.EventSource) {
    var url = log.getAttribute("data-follow");
    var base = url.split("?")[0];
    var offset = (url.split("offset=")[1] || "0");
    var follow = null, ended = false;
    var open = function () {
      if (follow || ended) { return; }
      follow = new EventSource(base + "?offset=" + offset);
      follow.addEventListener("log", function (e) {
        var atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
        log.appendChild(document.createTextNode(JSON.parse(e.data)));
        if (e.lastEventId) { offset = e.lastEventId; }
        if (atEnd) { log.scrollTop = log.scrollHeight; }
      });
      follow.addEventListener("end", function () { ended = true; close(); });
    };
    var close = function () { if (follow) { follow.close(); follow = null; } };
    document.addEventListener("visibilitychange", function () {
      if (document.hidden) { close(); } else { open(); }
    });
    open();
  }
})();
