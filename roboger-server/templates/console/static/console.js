// The Roboger console's only script: every page works without it; with
// it, an event history follows new events as the server sends them.
"use strict";
(function () {
  var list = document.querySelector("[data-stream]");
  if (!list || !window.EventSource) return;
  var live = document.getElementById("live");
  var source = new EventSource(list.getAttribute("data-stream"));
  source.addEventListener("event", function (m) {
    var update;
    try { update = JSON.parse(m.data); } catch (e) { return; }
    var none = document.getElementById("no-events");
    if (none) none.remove();
    var old = document.getElementById("event-" + update.id);
    if (old) {
      // Keep the keyboard where it was: on the same control of the new row.
      var focused = document.activeElement;
      var had = focused && old.contains(focused) ? focused : null;
      old.outerHTML = update.html;
      if (had && had.name) {
        var row = document.getElementById("event-" + update.id);
        var same = row && row.querySelector('[name="' + had.name + '"][value="' + had.value + '"]');
        if (same) same.focus();
      }
    } else {
      list.insertAdjacentHTML("afterbegin", update.html);
      if (live) live.textContent = "New event: " + update.subject;
    }
  });
  source.addEventListener("end", function () { source.close(); });
})();
