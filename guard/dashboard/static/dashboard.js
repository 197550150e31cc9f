// Guard dashboard: live updates without reloading.
// The page names its stream in <body data-stream>. The server sends "update" events whose data
// is a JSON object {fragment name: HTML}; each HTML was rendered (and escaped) by the server
// from the same templates as the page, and replaces the element marked data-live="<name>".
"use strict";
(function () {
  const url = document.body.dataset.stream;
  const badge = document.getElementById("live-state");
  if (!url || !window.EventSource) {
    return;
  }
  function show(connected) {
    if (badge) {
      badge.classList.toggle("on", connected);
      badge.title = connected ? "live updates on" : "live updates off, reconnecting";
    }
  }
  function connect() {
    const source = new EventSource(url);
    source.addEventListener("open", function () { show(true); });
    source.addEventListener("update", function (message) {
      const fragments = JSON.parse(message.data);
      for (const name of Object.keys(fragments)) {
        const target = document.querySelector('[data-live="' + CSS.escape(name) + '"]');
        if (target) {
          target.innerHTML = fragments[name];
        }
      }
      document.body.dataset.updated = String(Date.now());
    });
    source.addEventListener("error", function () {
      show(false);
      if (source.readyState === EventSource.CLOSED) {
        // Refused (the session expired?): a reload goes to the login page if needed.
        setTimeout(function () { window.location.reload(); }, 5000);
      }
    });
  }
  connect();
})();
