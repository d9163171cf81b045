// Print buttons on the slip pages (a file, so the pages' policy allows no inline script).
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("button.print").forEach(function (b) {
    b.addEventListener("click", function () { window.print(); });
  });
});
