// mendloop's dashboard: live updates (EventSource on /events/stream) and actions (fetch() to the API routes the
// CLI uses). No library, no build step. Every URL starts with the proxy's prefix (data-root on <html>).
(function () {
  "use strict";
  const html = document.documentElement;
  const root = html.dataset.root || "";
  const csrf = html.dataset.csrf || "";
  const notice = document.getElementById("notice");

  function say(text, isError) {
    if (!notice) return;
    notice.hidden = false;
    notice.textContent = text;
    notice.className = isError ? "notice error" : "notice";
  }

  async function call(method, path, body) {
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    if (csrf) headers["X-CSRF-Token"] = csrf;
    const answer = await fetch(root + path, {
      method: method,
      headers: headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
    });
    let data = null;
    try { data = await answer.json(); } catch (e) { data = null; }
    if (!answer.ok) {
      // The API's own words: its error body names the field and says what is wrong.
      const detail = data && (data.message || data.detail || data.error);
      const text = typeof detail === "string" ? detail : JSON.stringify(data);
      throw new Error(answer.status + ": " + (text || answer.statusText));
    }
    return data;
  }

  // -- actions -------------------------------------------------------------------------------------------------
  document.addEventListener("click", async function (ev) {
    const button = ev.target.closest("button[data-post]");
    if (!button) return;
    button.disabled = true;
    try {
      const body = button.dataset.body ? JSON.parse(button.dataset.body) : {};
      await call("POST", button.dataset.post, body);
      say(button.textContent.trim() + ": done", false);
      refresh();
    } catch (e) {
      say(button.textContent.trim() + " refused: " + e.message, true);
    } finally {
      button.disabled = false;
    }
  });

  const trigger = document.getElementById("trigger-form");
  if (trigger) {
    trigger.addEventListener("submit", async function (ev) {
      ev.preventDefault();
      const form = new FormData(trigger);
      const body = { error_type: form.get("error_type"), description: form.get("description"), wait_seconds: 0 };
      if (form.get("component")) body.component = form.get("component");
      try {
        const run = await call("POST", "/patches/trigger", body);
        say("Triggered run " + run.run_id + " (" + run.status + ")", false);
        refresh();
      } catch (e) {
        say("Trigger refused: " + e.message, true);
      }
    });
  }

  document.querySelectorAll("form[data-retry]").forEach(function (form) {
    form.addEventListener("submit", async function (ev) {
      ev.preventDefault();
      try {
        const run = await call("POST", form.dataset.retry, { from_step: new FormData(form).get("from_step") });
        window.location.href = root + "/ui/runs/" + encodeURIComponent(run.run_id);
      } catch (e) {
        say("Retry refused: " + e.message, true);
      }
    });
  });

  const logout = document.getElementById("logout");
  if (logout) {
    logout.addEventListener("click", async function () {
      try { await call("POST", "/ui/logout"); } catch (e) { /* the session may be over already */ }
      window.location.href = root + "/ui/login";
    });
  }

  // -- live ----------------------------------------------------------------------------------------------------
  // Each [data-live] section is replaced by the same section of the page read again, at most once per 400 ms;
  // a section holding the keyboard focus is left alone until focus leaves it.
  let timer = null;
  let again = false;
  function refresh() {
    if (timer) { again = true; return; }
    timer = setTimeout(async function () {
      try {
        const answer = await fetch(window.location.href, { headers: { Accept: "text/html" }, credentials: "same-origin" });
        if (answer.ok) {
          const doc = new DOMParser().parseFromString(await answer.text(), "text/html");
          document.querySelectorAll("[data-live]").forEach(function (el) {
            const fresh = el.id && doc.getElementById(el.id);
            if (!fresh || el.contains(document.activeElement)) return;
            const open = Array.from(el.querySelectorAll("details[open]")).map(function (d, i) { return i; });
            el.innerHTML = fresh.innerHTML;
            const details = el.querySelectorAll("details");
            open.forEach(function (i) { if (details[i]) details[i].open = true; });
          });
        }
      } catch (e) { /* the next event tries again */ }
      timer = null;
      if (again) { again = false; refresh(); }
    }, 400);
  }

  const feed = document.getElementById("feed");
  function append(data) {
    if (!feed) return;
    const empty = document.getElementById("feed-empty");
    if (empty) empty.remove();
    const li = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = (data.timestamp || "").slice(11, 19);
    li.appendChild(time);
    li.appendChild(document.createTextNode(" " + data.message));
    feed.insertBefore(li, feed.firstChild);
    while (feed.children.length > 30) feed.removeChild(feed.lastChild);
  }

  if (feed && window.EventSource) {
    const types = JSON.parse(document.getElementById("live-types").textContent);
    const after = feed.dataset.after || "0";
    const stream = new EventSource(root + "/events/stream?after=" + encodeURIComponent(after), { withCredentials: true });
    types.forEach(function (type) {
      stream.addEventListener(type, function (ev) {
        let data = null;
        try { data = JSON.parse(ev.data); } catch (e) { return; }
        append(data);
        refresh();
      });
    });
    html.dataset.live = "connecting";
    stream.onopen = function () { html.dataset.live = "open"; };
    stream.onerror = function () { html.dataset.live = "retrying"; };
  }
})();
