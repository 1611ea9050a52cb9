// The console's only script, shipped with it (consoles run on networks without internet).
// The pages work without it; it adds "select all" and the overview's own refresh.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const box of document.querySelectorAll("input[data-select-all]")) {
    box.addEventListener("change", () => {
      for (const row of box.form.querySelectorAll("input[name=ids]")) row.checked = box.checked;
    });
  }
  const live = document.getElementById("live");
  if (!live) return;
  const every = Math.max(1, Number(live.dataset.refresh) || 5) * 1000;
  const refresh = async () => {
    try {
      const answer = await fetch(live.dataset.src, { credentials: "same-origin" });
      if (answer.redirected) {
        location.reload(); // logged out meanwhile: show the login form, not a page inside a page
        return;
      }
      if (answer.ok) {
        live.innerHTML = await answer.text();
        live.dataset.refreshedAt = String(Date.now());
      }
    } catch (_) {
      // The console or the network is away: try again at the next tick.
    }
    setTimeout(refresh, every);
  };
  setTimeout(refresh, every);
});
