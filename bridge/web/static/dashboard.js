// The IT dashboard's auto-refresh (a file: the pages' policy runs no inline script).
// Every 15 s the live part of /ui/it is fetched again and swapped in, unless the user is in a
// form or has paused the refresh; a failed fetch is shown, the page itself stays.
document.addEventListener("DOMContentLoaded", function () {
  var live = document.getElementById("live");
  if (!live) { return; }
  var every = parseInt(live.getAttribute("data-refresh-s") || "15", 10) * 1000;
  function refresh() {
    if (document.hidden || live.querySelector(":focus")) { return; }
    fetch("/ui/it/live" + window.location.search, {credentials: "same-origin"})
      .then(function (r) {
        if (r.redirected || !r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) { live.innerHTML = html; live.classList.remove("stale"); })
      .catch(function () { live.classList.add("stale"); });
  }
  setInterval(refresh, every);
});
