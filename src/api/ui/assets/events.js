// training-worker dashboard: one connection to /ui/events shared by every open tab (a
// SharedWorker), so that ten tabs hold one event stream, not ten: a browser allows only a
// few connections per host over HTTP/1.1, and every stream would hold one.
"use strict";
var ports = [];
var source = null;
var state = "connecting…";
function broadcast(message) {
  ports.forEach(function (port) { port.postMessage(message); });
}
self.onconnect = function (e) {
  var port = e.ports[0];
  ports.push(port);
  port.start();
  port.postMessage(state);
  if (source) { return; }
  source = new EventSource("/ui/events");
  source.addEventListener("open", function () { state = "live"; broadcast(state); });
  source.addEventListener("error", function () { state = "reconnecting…"; broadcast(state); });
  source.addEventListener("change", function () { broadcast("change"); });
};
