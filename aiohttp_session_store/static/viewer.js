// The viewer's search box: asks the JSON API (GET <api>?q=...) and lists the matching calls.
// Everything from the API is put in the page with textContent, never as markup.
"use strict";

(function () {
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function clip(text, width) {
    if (text === undefined || text === null) return "-";
    const line = String(text).split(/\s+/).join(" ").trim();
    return line.length <= width ? line : line.slice(0, width - 1) + "\u2026";
  }

  function render(out, form, body) {
    const found = Array.isArray(body.requests) ? body.requests : [];
    const total = typeof body.total === "number" ? body.total : found.length;
    out.replaceChildren(el("p", "note", total + " matching call(s)"));
    const list = el("ul", "search-hits");
    for (const hit of found) {
      const item = el("li", "search-hit");
      if (typeof hit.session_id === "string" && hit.session_id) {
        const link = el("a", "session-link", hit.session_id.slice(0, 12));
        link.href = form.dataset.sessions + encodeURIComponent(hit.session_id);
        link.title = hit.session_id;
        item.append(link, " ");
      }
      item.append(el("span", "fact", hit.timestamp), " ", el("code", null, hit.model), " ");
      const response = hit.response || {};
      if (response.outcome) item.append(el("span", "outcome", response.outcome), " ");
      item.append(el("div", "hit-user", "User: " + clip(hit.user_message, 160)));
      if (response.reply !== undefined && response.reply !== null) {
        item.append(el("div", "hit-reply", "Reply: " + clip(response.reply, 160)));
      }
      if (hit.snippet) item.append(el("div", "hit-snippet", clip(hit.snippet, 200)));
      list.append(item);
    }
    out.append(list);
  }

  async function search(form, out) {
    const q = form.elements.q.value.trim();
    if (!q) return;
    const url = form.dataset.api + "?" + new URLSearchParams({ q: q, limit: "50" });
    out.replaceChildren(el("p", "note", "Searching\u2026"));
    try {
      const resp = await fetch(url, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      let body = null;
      try {
        body = await resp.json();
      } catch (ignored) {
        body = null;
      }
      if (!resp.ok) {
        const message = body && body.error && body.error.message ? body.error.message : resp.status;
        out.replaceChildren(el("p", "error", "Search failed: " + message));
        return;
      }
      render(out, form, body || {});
    } catch (err) {
      out.replaceChildren(el("p", "error", "Search failed: " + err));
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    const form = document.getElementById("search");
    const out = document.getElementById("search-results");
    if (!form || !out) return;
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      search(form, out);
    });
  });
})();
