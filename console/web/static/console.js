// The live indicator in the header: what the event stream (htmx's SSE extension) is doing.
// Everything else on the pages is htmx attributes; no page needs this file to work.
(function () {
  function mark(state, text) {
    var el = document.getElementById("live-status");
    if (el) { el.dataset.state = state; el.textContent = text; }
  }
  var opened = 0;
  document.addEventListener("htmx:sseOpen", function () {
    mark("on", "live");
    // A stream opened again after a break: changes may have been missed meanwhile, so re-read.
    opened += 1;
    var live = document.getElementById("live");
    if (opened > 1 && live && window.htmx) { window.htmx.trigger(live, "resync"); }
  });
  document.addEventListener("htmx:sseError", function () { mark("lost", "reconnecting"); });
  document.addEventListener("htmx:afterSwap", function (event) {
    // Tests and people can tell a re-read happened without a reload.
    var live = document.getElementById("live");
    if (live && event.detail.target === live) {
      live.dataset.updates = String(Number(live.dataset.updates || "0") + 1);
    }
  });
})();
