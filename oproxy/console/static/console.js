// oproxy console: the pages' behaviour.  Figures come from /ui/api/...;
// every change sends the session's CSRF token in X-CSRF-Token.
"use strict";

(function () {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const CSRF = csrfMeta ? csrfMeta.getAttribute("content") : "";
  const POLL_MS = 5000;

  // -- talking to the daemon ---------------------------------------------------

  class ApiError extends Error {
    constructor(message, status, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  async function api(path, { method = "GET", body } = {}) {
    const options = { method, headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" };
    if (method !== "GET") {
      options.headers["X-CSRF-Token"] = CSRF;
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body || {});
    }
    const response = await fetch(path, options);
    return answer(response);
  }

  // Read `path`; when that fails, say why in `box` and answer null.
  async function readOrSay(path, box) {
    try {
      return await api(path);
    } catch (e) {
      show(box, e.message, "error");
      return null;
    }
  }

  async function answer(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (response.status === 401) {
      window.location.assign("/ui/login?ended=1&next=" + encodeURIComponent(window.location.pathname));
      throw new ApiError("Your session has ended.", 401, body);
    }
    if (!response.ok) {
      const message = body && body.error && body.error.message ? body.error.message : `HTTP ${response.status}`;
      throw new ApiError(message, response.status, body);
    }
    return body;
  }

  // Poll `refresh` every few seconds while the page is visible (sooner
  // while it answers true: the daemon is still reading the access log).
  function poll(refresh) {
    let timer = null;
    const run = async () => {
      timer = null;
      let soon = false;
      try {
        soon = (await refresh()) === true;
      } catch (e) {
        if (!(e instanceof ApiError && e.status === 401)) console.warn(e);
      }
      if (!document.hidden) timer = setTimeout(run, soon ? 1000 : POLL_MS);
    };
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && timer === null) run();
    });
    run();
  }

  // -- formatting -----------------------------------------------------------------

  const integer = new Intl.NumberFormat();
  function count(value) {
    if (value === null || value === undefined) return "–";
    return integer.format(Math.round(value));
  }
  function compact(value) {
    if (value === null || value === undefined) return "–";
    if (value >= 1e9) return (value / 1e9).toFixed(1) + "G";
    if (value >= 1e6) return (value / 1e6).toFixed(1) + "M";
    if (value >= 1e4) return (value / 1e3).toFixed(1) + "k";
    return integer.format(Math.round(value));
  }
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
    if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
    return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  }
  function percent(fraction) {
    if (fraction === null || fraction === undefined) return "–";
    const value = fraction * 100;
    return `${value < 10 && value > 0 ? value.toFixed(1) : Math.round(value)}%`;
  }
  function bytes(value) {
    if (value === null || value === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let unit = 0;
    while (value >= 1000 && unit < units.length - 1) {
      value /= 1000;
      unit += 1;
    }
    return `${value.toFixed(unit === 0 || value >= 100 ? 0 : 1)} ${units[unit]}`;
  }
  function time(seconds) {
    if (!seconds) return "–";
    return new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }
  function shortId(id) {
    return id && id.length > 16 ? `${id.slice(0, 14)}…` : id || "–";
  }
  function ago(iso) {
    if (!iso) return "–";
    const seconds = (Date.now() - Date.parse(iso)) / 1000;
    if (seconds < 60) return "just now";
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return iso.slice(0, 10);
  }

  // -- building the DOM (text only: nothing is parsed as HTML) --------------------

  // A page's elements under the names its code gives them: { name: "element-id", ... }.
  function elements(ids) {
    return Object.fromEntries(Object.entries(ids).map(([name, id]) => [name, document.getElementById(id)]));
  }

  function h(name, attributes, ...children) {
    const node = document.createElement(name);
    for (const [key, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fill(tbody, rows, columns, emptyText) {
    tbody.replaceChildren();
    if (!rows.length) {
      tbody.appendChild(h("tr", {}, h("td", { colspan: columns, class: "empty" }, emptyText)));
      return;
    }
    for (const row of rows) tbody.appendChild(row);
  }

  function show(node, text, kind) {
    node.textContent = text || "";
    if (kind) node.className = kind;
    node.hidden = !text;
  }

  function pill(text, kind) {
    return h("span", { class: `pill ${kind || ""}` }, text);
  }

  function statusCell(status) {
    return h("td", { class: `status-${String(status)[0]}` }, String(status));
  }

  // A confirmation in the page's <dialog>: resolves true when confirmed.
  function confirmWith(title, text, action) {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-title").textContent = title;
    document.getElementById("confirm-text").textContent = text;
    document.getElementById("confirm-button").textContent = action;
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "confirm"), { once: true });
      dialog.showModal();
    });
  }

  // -- the dashboard ----------------------------------------------------------------

  const COLORS = { ok: "#2458d6", c4: "#e6a23c", c5: "#d64545", p50: "#2458d6", p95: "#8b5cf6", ttft: "#17a672", in: "#0ea5e9", out: "#6d28d9" };

  function legend(id, entries) {
    const list = document.getElementById(id);
    list.replaceChildren(...entries.map(([cls, text]) => h("li", {}, h("span", { class: `swatch ${cls}` }), text)));
  }

  function dashboard() {
    const charts = window.OproxyCharts;
    let period = "hour";
    let latest = null;
    legend("legend-requests", [["s-ok", "Answered"], ["s-4xx", "Refused (4xx)"], ["s-5xx", "Failed (5xx)"]]);
    legend("legend-latency", [["s-p50", "Latency p50"], ["s-p95", "Latency p95"], ["s-ttft", "First token p50"]]);
    legend("legend-tokens", [["s-in", "Tokens in"], ["s-out", "Tokens out"]]);
    for (const button of document.querySelectorAll("[data-period]")) {
      button.addEventListener("click", () => {
        period = button.dataset.period;
        for (const other of document.querySelectorAll("[data-period]")) other.setAttribute("aria-pressed", String(other === button));
        if (latest) breakdowns(latest);
      });
    }

    const tileFormats = {
      requests: count, error_rate: percent, latency_p50: duration, latency_p95: duration,
      first_token_p50: duration, prompt_tokens: compact, completion_tokens: compact,
    };

    function tiles(data) {
      const hour = data.hour ? data.hour.total : null;
      const start = data.since_start ? data.since_start.total : {};
      for (const [field, format] of Object.entries(tileFormats)) {
        const value = document.querySelector(`[data-tile="${field}"]`);
        const sub = document.querySelector(`[data-tile-start="${field}"]`);
        value.textContent = format(hour ? hour[field] : start[field]);
        sub.textContent = hour ? `since start: ${format(start[field])}` : "since start";
      }
    }

    function notice(data) {
      const box = document.getElementById("notice");
      const log = data.access_log;
      if (!log.configured) show(box, log.advice);
      else if (log.loading) show(box, `Reading the last hour of the access log… ${percent(log.progress || 0)}`);
      else show(box, "");
    }

    function timeCharts(data) {
      const minutes = data.minutes;
      const times = minutes.map((m) => m.minute);
      charts.columns(document.getElementById("chart-requests"), times, [
        { name: "Answered", color: COLORS.ok, values: minutes.map((m) => m.requests - m.client_errors - m.errors) },
        { name: "Refused (4xx)", color: COLORS.c4, values: minutes.map((m) => m.client_errors) },
        { name: "Failed (5xx)", color: COLORS.c5, values: minutes.map((m) => m.errors) },
      ], count);
      charts.lines(document.getElementById("chart-latency"), times, [
        { name: "Latency p50", color: COLORS.p50, values: minutes.map((m) => m.latency_p50) },
        { name: "Latency p95", color: COLORS.p95, values: minutes.map((m) => m.latency_p95) },
        { name: "First token p50", color: COLORS.ttft, values: minutes.map((m) => m.first_token_p50) },
      ], duration);
      charts.columns(document.getElementById("chart-tokens"), times, [
        { name: "Tokens in", color: COLORS.in, values: minutes.map((m) => m.prompt_tokens) },
        { name: "Tokens out", color: COLORS.out, values: minutes.map((m) => m.completion_tokens) },
      ], compact);
    }

    function breakdowns(data) {
      const source = (period === "hour" && data.hour ? data.hour : data.since_start) || {};
      for (const section of document.querySelectorAll(".breakdown")) {
        const dimension = section.dataset.dimension;
        const rows = source[`by_${dimension}`] || [];
        const byRequests = rows.some((row) => row.requests !== null && row.requests !== undefined);
        const measure = (row) => (byRequests ? row.requests : (row.prompt_tokens || 0) + (row.completion_tokens || 0));
        const svg = section.querySelector("svg");
        svg.setAttribute("aria-label", `${byRequests ? "Requests" : "Tokens"} by ${dimension}`);
        charts.bars(svg, rows.map((row) => ({ label: row.name, value: measure(row) })), compact, byRequests ? COLORS.ok : COLORS.out);
        const table = h("table", { class: "data" },
          h("thead", {}, h("tr", {},
            h("th", { scope: "col" }, dimension[0].toUpperCase() + dimension.slice(1)),
            h("th", { scope: "col", class: "num" }, "Req."),
            h("th", { scope: "col", class: "num" }, "Err."),
            h("th", { scope: "col", class: "num" }, "p50"),
            h("th", { scope: "col", class: "num" }, "p95"),
            h("th", { scope: "col", class: "num" }, "TTFT"),
            h("th", { scope: "col", class: "num" }, "In"),
            h("th", { scope: "col", class: "num" }, "Out"))),
          h("tbody"));
        fill(table.tBodies[0], rows.map((row) => h("tr", {},
          h("td", {}, row.name),
          h("td", { class: "num" }, count(row.requests)),
          h("td", { class: "num" }, percent(row.error_rate)),
          h("td", { class: "num" }, duration(row.latency_p50)),
          h("td", { class: "num" }, duration(row.latency_p95)),
          h("td", { class: "num" }, duration(row.first_token_p50)),
          h("td", { class: "num" }, compact(row.prompt_tokens)),
          h("td", { class: "num" }, compact(row.completion_tokens)))), 8, "Nothing yet");
        section.querySelector(".table-wrap").replaceChildren(table);
      }
    }

    // The configuration's backend types, as their servers call themselves.
    const KIND_NAMES = {
      ollama: "Ollama", openai: "OpenAI-compatible", lmstudio: "LM Studio", llamacpp: "llama.cpp",
      vllm: "vLLM", tgi: "TGI", tei: "TEI", huggingface: "Hugging Face",
    };

    function backends(data) {
      const list = document.getElementById("backends");
      list.replaceChildren(...data.backends.map((b) => {
        const state = b.circuit_open ? pill("Held back", "warn") : b.up === null ? pill("Unknown", "") : b.up ? pill("Up", "ok") : pill("Down", "bad");
        const meta = [KIND_NAMES[b.kind] || b.kind, `${b.models} models`];
        if (b.probe_latency_seconds !== null && b.probe_latency_seconds !== undefined) meta.push(`probe ${duration(b.probe_latency_seconds)}`);
        return h("li", { class: "backend" },
          h("div", { class: "backend-head" }, h("strong", {}, b.name), state, h("span", { class: "backend-meta" }, meta.join(" · "))),
          h("p", { class: "backend-loaded" }, b.loaded.length ? `Loaded: ${b.loaded.join(", ")}` : "No model loaded"));
      }));
    }

    function recent(data) {
      fill(document.querySelector("#recent tbody"), data.recent.map((r) => h("tr", {},
        h("td", { class: "nowrap" }, time(r.time)),
        h("td", {}, r.key || "–"),
        h("td", {}, r.model && r.model !== "-" ? r.model : "–"),
        h("td", {}, r.backend && r.backend !== "-" ? r.backend : "–"),
        statusCell(r.status),
        h("td", { class: "num" }, duration(r.latency_seconds)),
        h("td", { class: "num" }, count(r.prompt_tokens)),
        h("td", { class: "num" }, count(r.completion_tokens)))),
      8, data.access_log.configured ? "No requests in the last hour" : "The access log is not configured");
    }

    poll(async () => {
      const data = await api("/ui/api/dashboard");
      latest = data;
      tiles(data);
      notice(data);
      timeCharts(data);
      breakdowns(data);
      backends(data);
      recent(data);
      document.getElementById("updated").textContent = `Updated ${time(data.generated)} · refreshes every ${POLL_MS / 1000} s`;
      return data.access_log.loading === true || data.since_start === null;
    });
    window.addEventListener("resize", () => { if (latest) { timeCharts(latest); breakdowns(latest); } });
  }

  // -- models --------------------------------------------------------------------------

  function models() {
    const table = document.querySelector("#models-table tbody");
    const { message, select, form, box, bar, percentText, statusText, error } = elements({
      message: "models-message", select: "pull-backend", form: "pull-form", box: "pull-progress",
      bar: "pull-bar", percentText: "pull-percent", statusText: "pull-status", error: "pull-error",
    });

    async function load() {
      const data = await readOrSay("/ui/api/models", message);
      if (!data) return;
      const problems = data.backends.filter((b) => b.error).map((b) => `${b.name}: ${b.error}`);
      show(message, problems.length ? `Some backends did not list their models. ${problems.join("; ")}` : "", "error");
      const chosen = select.value;
      select.replaceChildren(...data.backends.filter((b) => b.can_pull).map((b) => h("option", { value: b.name }, b.name)));
      if (chosen) select.value = chosen;
      select.disabled = select.options.length <= 1;
      fill(table, data.models.map((m) => {
        const actions = h("div", { class: "row-actions" });
        if (m.can_load) {
          const verb = m.loaded ? "Unload" : "Load";
          actions.appendChild(h("button", { type: "button", class: "small", onclick: () => loadOrUnload(m, !m.loaded) }, verb));
        }
        if (m.can_delete) {
          actions.appendChild(h("button", { type: "button", class: "small danger", onclick: () => remove(m) }, "Delete"));
        }
        return h("tr", { "data-model": m.name, "data-backend": m.backend },
          h("td", {}, h("strong", {}, m.name)),
          h("td", {}, m.backend),
          h("td", { class: "num" }, bytes(m.size)),
          h("td", {}, m.family || "–"),
          h("td", {}, m.parameter_size || "–"),
          h("td", {}, m.quantization || "–"),
          h("td", {}, m.loaded === null || m.loaded === undefined ? "–" : m.loaded ? pill("Loaded", "ok") : pill("No", "")),
          h("td", {}, m.aliases.length ? m.aliases.map((a) => pill(a, "info")) : "–"),
          h("td", {}, actions));
      }), 9, "No models");
      fill(document.querySelector("#aliases-table tbody"), data.rules.map((r) => h("tr", {},
        h("td", {}, h("code", {}, r.name)),
        h("td", {}, r.target ? h("code", {}, r.target) : "(the name itself)"),
        h("td", {}, r.backends.length ? r.backends.join(", ") : "any"),
        h("td", {}, r.fallbacks.length ? r.fallbacks.join(", ") : "–"))), 4, "No aliases or rules in the configuration");
      document.getElementById("models-updated").textContent = `${data.models.length} models on ${data.backends.length} backends`;
    }

    async function loadOrUnload(model, loading) {
      show(message, "");
      try {
        await api(`/ui/api/models/${loading ? "load" : "unload"}`, { method: "POST", body: { model: model.name, backend: model.backend } });
      } catch (e) {
        show(message, e.message, "error");
      }
      await load();
    }

    async function remove(model) {
      const sure = await confirmWith(`Delete ${model.name}?`, `The model is removed from ${model.backend}'s disk. Pull it again to get it back.`, "Delete");
      if (!sure) return;
      show(message, "");
      try {
        await api("/ui/api/models/delete", { method: "POST", body: { model: model.name, backend: model.backend } });
      } catch (e) {
        show(message, e.message, "error");
      }
      await load();
    }

    function progressLine(line) {
      if (line.error) {
        show(error, line.error, "error");
        statusText.textContent = "Failed";
        return;
      }
      if (typeof line.percent === "number") {
        bar.value = line.percent;
        percentText.textContent = `${Math.round(line.percent)}%`;
      }
      let text = line.status;
      if (line.total) text += ` — ${bytes(line.completed)} of ${bytes(line.total)}`;
      if (line.all_total && line.all_total !== line.total) text += ` (all layers: ${bytes(line.all_completed)} of ${bytes(line.all_total)})`;
      statusText.textContent = text;
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const model = document.getElementById("pull-model").value.trim();
      const button = form.querySelector("button[type=submit]");
      show(error, "");
      box.hidden = false;
      bar.value = 0;
      percentText.textContent = "0%";
      statusText.textContent = `Asking for ${model}…`;
      button.disabled = true;
      try {
        const response = await fetch("/ui/api/models/pull", {
          method: "POST",
          credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF, Accept: "application/x-ndjson" },
          body: JSON.stringify({ model, backend: select.value || undefined }),
        });
        if (!response.ok) {
          await answer(response);
          return;
        }
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let newline;
          while ((newline = buffer.indexOf("\n")) >= 0) {
            const text = buffer.slice(0, newline).trim();
            buffer = buffer.slice(newline + 1);
            if (text) progressLine(JSON.parse(text));
          }
        }
        if (buffer.trim()) progressLine(JSON.parse(buffer));
      } catch (e) {
        show(error, e.message, "error");
        statusText.textContent = "Failed";
      } finally {
        button.disabled = false;
        await load();
      }
    });

    load();
  }

  // -- keys -----------------------------------------------------------------------------

  function keys() {
    const table = document.querySelector("#keys-table tbody");
    const { listError, form, createError, secretBox, secretValue } = elements({
      listError: "keys-error", form: "create-form", createError: "create-error",
      secretBox: "new-key", secretValue: "new-key-value",
    });

    function limitsText(policy) {
      const limits = policy.limits || {};
      const parts = [];
      if (limits.rpm) parts.push(`${count(limits.rpm)} req/min`);
      if (limits.tpm) parts.push(`${compact(limits.tpm)} tok/min`);
      if (limits.max_parallel) parts.push(`${limits.max_parallel} parallel`);
      return parts.length ? parts.join(", ") : "none";
    }

    function quota(used, limit) {
      if (!limit) return h("span", { class: "muted small" }, "no quota");
      const share = Math.min(1, (used || 0) / limit);
      const meter = h("div", { class: share >= 1 ? "meter full" : "meter" }, h("span"));
      meter.firstChild.style.width = `${(share * 100).toFixed(1)}%`;
      return h("div", { class: "quota" }, h("span", { class: "small" }, `${compact(used || 0)} / ${compact(limit)}`), meter);
    }

    function showSecret(title, key) {
      document.getElementById("new-key-title").textContent = title;
      secretValue.value = key;
      document.getElementById("copy-status").textContent = "";
      secretBox.hidden = false;
      secretValue.focus();
      secretValue.select();
    }

    async function load() {
      const data = await readOrSay("/ui/api/keys", listError);
      if (!data) return;
      show(listError, "");
      fill(table, data.data.map((k) => {
        const policy = k.policy || {};
        const actions = h("div", { class: "row-actions" });
        if (k.source === "store" && k.status !== "revoked") {
          actions.appendChild(h("button", { type: "button", class: "small", onclick: () => rotate(k) }, "Rotate"));
          actions.appendChild(h("button", { type: "button", class: "small danger", onclick: () => revoke(k) }, "Revoke"));
        }
        const statusKind = { active: "ok", revoked: "bad", expired: "warn" }[k.status] || "";
        return h("tr", { "data-key": k.name },
          h("td", {}, h("strong", {}, k.name), " ", policy.admin ? pill("admin", "info") : null, k.source === "file" ? pill("file", "") : null),
          h("td", {}, k.id ? h("code", {}, k.id) : "–"),
          h("td", {}, pill(k.status, statusKind)),
          h("td", {}, policy.models && policy.models.length ? policy.models.join(", ") : "all"),
          h("td", {}, limitsText(policy)),
          h("td", {}, policy.expires ? new Date(policy.expires * 1000).toISOString().slice(0, 10) : "never"),
          h("td", {}, k.usage ? quota(k.usage.today, k.usage.daily_quota) : "–"),
          h("td", {}, k.usage ? quota(k.usage.this_month, k.usage.monthly_quota) : "–"),
          h("td", {}, ago(k.last_used)),
          h("td", {}, actions));
      }), 10, "No keys yet");
      document.getElementById("keys-updated").textContent = `${data.data.length} keys · ${data.last_used_since}`;
    }

    async function revoke(key) {
      const sure = await confirmWith(`Revoke ${key.name}?`, "Requests with this key are refused from now on, in every worker. This cannot be undone.", "Revoke");
      if (!sure) return;
      try {
        await api(`/ui/api/keys/${encodeURIComponent(key.id)}/revoke`, { method: "POST" });
      } catch (e) {
        show(listError, e.message, "error");
      }
      await load();
    }

    async function rotate(key) {
      const sure = await confirmWith(`Rotate ${key.name}?`, "The key gets a new secret; the old one stops working at once.", "Rotate");
      if (!sure) return;
      try {
        const rotated = await api(`/ui/api/keys/${encodeURIComponent(key.id)}/rotate`, { method: "POST" });
        showSecret(`New secret for ${key.name}`, rotated.key);
      } catch (e) {
        show(listError, e.message, "error");
      }
      await load();
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      show(createError, "");
      const value = (id) => document.getElementById(id).value.trim();
      const body = { name: value("key-name"), limits: {} };
      const models = value("key-models").split(/[\s,]+/).filter(Boolean);
      if (models.length) body.models = models;
      for (const [id, name] of [["key-rpm", "rpm"], ["key-tpm", "tpm"], ["key-daily", "daily_tokens"], ["key-monthly", "monthly_tokens"], ["key-parallel", "max_parallel"]]) {
        if (value(id)) body.limits[name] = Number(value(id));
      }
      if (value("key-expires")) body.expires = value("key-expires");
      if (document.getElementById("key-admin").checked) body.admin = true;
      try {
        const created = await api("/ui/api/keys", { method: "POST", body });
        showSecret(`New key ${created.name}`, created.key);
        form.reset();
      } catch (e) {
        show(createError, e.message, "error");
      }
      await load();
    });

    document.getElementById("copy-key").addEventListener("click", async () => {
      const status = document.getElementById("copy-status");
      try {
        await navigator.clipboard.writeText(secretValue.value);
        status.textContent = "Copied to the clipboard.";
      } catch (e) {
        secretValue.select();
        const copied = document.execCommand && document.execCommand("copy");
        status.textContent = copied ? "Copied to the clipboard." : "Select the key and copy it (Ctrl+C).";
      }
    });

    load();
  }

  // -- configuration -----------------------------------------------------------------

  function configuration() {
    const { form, text, base, result, validateButton, applyButton } = elements({
      form: "config-form", text: "config-text", base: "config-base", result: "config-result",
      validateButton: "validate", applyButton: "apply",
    });
    const writable = form.dataset.writable === "true";
    text.readOnly = !writable;
    applyButton.disabled = !writable;
    validateButton.disabled = !writable;

    function report(kind, heading, lines) {
      result.replaceChildren(h("p", {}, h("strong", {}, heading)));
      if (lines && lines.length) result.appendChild(h("ul", {}, lines));
      result.className = `result ${kind}`;
      result.hidden = false;
    }

    function problemLines(problems) {
      return problems.map((p) => h("li", {}, p.line ? h("span", { class: "line" }, `Line ${p.line}: `) : null, p.message));
    }

    async function send(action) {
      validateButton.disabled = applyButton.disabled = true;
      report("", action === "apply" ? "Applying…" : "Validating…");
      try {
        const answer = await api(`/ui/api/config/${action}`, { method: "POST", body: { text: text.value, base: base.value } });
        if (action === "validate") {
          if (answer.valid) report("success", "The configuration is valid.", answer.notes.map((n) => h("li", {}, n)));
          else report("error", "The configuration is not valid.", problemLines(answer.problems));
        } else {
          report(answer.reloaded ? "success" : "notice", answer.message, [
            h("li", {}, `The previous version is kept as ${answer.backup}.`),
            ...answer.notes.map((n) => h("li", {}, n)),
          ]);
          const fresh = await api("/ui/api/config");
          text.value = fresh.text;
          base.value = fresh.digest;
        }
      } catch (e) {
        const problems = e.body && e.body.problems;
        if (problems && problems.length) report("error", "The configuration is not valid, so nothing was changed.", problemLines(problems));
        else report("error", e.message);
      } finally {
        validateButton.disabled = applyButton.disabled = !writable;
      }
    }

    validateButton.addEventListener("click", () => send("validate"));
    applyButton.addEventListener("click", () => send("apply"));
    // Tab indents in the editor instead of leaving it.
    text.addEventListener("keydown", (event) => {
      if (event.key !== "Tab" || event.shiftKey || text.readOnly) return;
      event.preventDefault();
      const start = text.selectionStart;
      text.setRangeText("  ", start, text.selectionEnd, "end");
    });
  }

  // -- requests ------------------------------------------------------------------------

  function requests() {
    const form = document.getElementById("filters");
    const table = document.querySelector("#requests-table tbody");
    const selects = { key: document.getElementById("filter-key"), model: document.getElementById("filter-model") };
    const status = document.getElementById("filter-status");

    function options(select, values, anyText) {
      const chosen = select.value;
      const known = new Set(values);
      if (chosen) known.add(chosen);
      select.replaceChildren(h("option", { value: "" }, anyText), ...[...known].sort().map((v) => h("option", { value: v }, v)));
      select.value = chosen;
    }

    async function refresh() {
      const query = new URLSearchParams({ limit: "200" });
      if (selects.key.value) query.set("key", selects.key.value);
      if (selects.model.value) query.set("model", selects.model.value);
      if (status.value) query.set("status", status.value);
      const data = await api(`/ui/api/requests?${query}`);
      options(selects.key, data.keys, "Any key");
      options(selects.model, data.models, "Any model");
      const box = document.getElementById("notice");
      show(box, data.access_log.configured ? (data.access_log.loading ? "Reading the last hour of the access log…" : "") : data.access_log.advice);
      fill(table, data.data.map((r) => h("tr", {},
        h("td", { class: "nowrap" }, time(r.time)),
        h("td", { class: "nowrap" }, h("a", { href: `/ui/requests/${encodeURIComponent(r.request_id)}`, title: r.request_id, "aria-label": r.request_id }, h("code", {}, shortId(r.request_id)))),
        h("td", {}, r.key || "–"),
        h("td", {}, r.model && r.model !== "-" ? r.model : "–"),
        h("td", {}, r.backend && r.backend !== "-" ? r.backend : "–"),
        h("td", { class: "nowrap" }, h("span", { class: "method" }, r.method), h("code", {}, r.path)),
        statusCell(r.status),
        h("td", { class: "num" }, duration(r.latency_seconds)),
        h("td", { class: "num" }, duration(r.first_token_seconds)),
        h("td", { class: "num" }, count(r.prompt_tokens)),
        h("td", { class: "num" }, count(r.completion_tokens)))), 11, "No requests match");
      document.getElementById("requests-updated").textContent = `${data.data.length} shown · updated ${time(Date.now() / 1000)}`;
      return data.access_log.loading === true;
    }

    form.addEventListener("change", () => refresh().catch((e) => console.warn(e)));
    form.addEventListener("submit", (event) => event.preventDefault());
    poll(refresh);
  }

  const PAGES = { dashboard, models, keys, configuration, requests };

  function start() {
    const page = PAGES[document.body.dataset.page];
    if (page) page();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
