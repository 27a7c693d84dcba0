// Sandbox Broker dashboard. Plain JavaScript, no dependencies, served from the broker itself.
//
// Sources (all admin API, bearer token from sessionStorage):
//   pool chart + counts + projector lag  <- GET {base}/admin/stats (every 5 s, and after live events)
//   allocations per minute (last hour)   <- GET {base}/admin/events?type=SandboxAllocated&since=…
//                                           then kept current from the live stream
//   live events table                    <- GET {base}/admin/events/stream, read with fetch() so the
//                                           token goes in the Authorization header (EventSource
//                                           cannot set headers); resumed with Last-Event-ID
//   allocation open / drained            <- GET {base}/admin/pool (with the stats, and after
//                                           PoolDrained / PoolResumed events)
//   drain / resume buttons               -> POST {base}/admin/pool/drain?prefix=&reason=,
//                                           POST {base}/admin/pool/resume?prefix=, each after a
//                                           confirmation in the page
//   quarantined sandboxes + retry        <- GET {base}/admin/sandboxes?status=deletion_failed,
//                                           POST {base}/admin/sandboxes/{id}/retry-deletion
//   pool by prefix + low water           <- the same GET {base}/admin/stats (by_prefix, low_water)
//   projector lag chart                  <- lag samples of those stats polls, kept for 30 minutes
//   allocation outcomes                  <- GET {base}/admin/outcomes every 5 s: what this API
//                                           instance counted since it started, in total and per
//                                           minute over the last hour (behind a load balancer,
//                                           the instance that answered)
//   live events in words                 <- the live stream above; sandbox names from the
//                                           registrations seen and GET {base}/admin/sandboxes/{id}
//   admin jobs                           <- GET {base}/admin/jobs (every 5 s)
//   reservations (reserved/free/used)    <- the same GET {base}/admin/stats (reservations)
"use strict";

(function () {
  const BASE = document.querySelector('meta[name="api-base"]').getAttribute("content") || "/v1";
  const TOKEN_KEY = "sandbox-broker.admin-token";
  const STATUSES = ["available", "allocated", "pending_deletion", "stale", "deletion_failed", "deleted"];
  const FEED_ROWS = 50;
  const STATS_EVERY_MS = 5000;
  const QUARANTINE_EVERY_MS = 15000;
  const RECONNECT_MS = 2000;
  const SVG = "http://www.w3.org/2000/svg";
  const OUTCOMES_EVERY_MS = 5000;
  const LAG_WINDOW_MS = 30 * 60 * 1000;
  // The server's outcome names (broker_allocate_total{outcome}) by the bar they are drawn in.
  const OUTCOME_BARS = [
    ["o201", "201 new", ["success"]],
    ["o200", "200 replay", ["idempotent"]],
    ["o409", "409 none left", ["no_sandboxes"]],
    ["o404", "404 unknown prefix", ["unknown_prefix"]],
    ["o429", "429 over a limit", ["quota_exceeded", "caller_limit", "address_limit", "rate_limited"]],
    ["o503", "503 drained", ["maintenance"]],
    ["o5xx", "failed", ["error"]],
  ];
  const FEED_KEEP = 400; // events kept for re-drawing the table (grouping, the internal toggle)
  const lagSamples = []; // [ms epoch, lag ms]

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let stream = null; // AbortController of the live stream
  let timers = [];
  let lastEventId = null;
  let serverOffsetMs = 0; // server clock - browser clock
  const allocationKeys = new Set();
  const allocationTimes = []; // ms epoch of each allocation seen in the last hour
  let statsPending = null;

  // ---- helpers -------------------------------------------------------------------------------

  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = !message;
  }

  function setConn(text, cls) {
    const el = $("conn");
    el.textContent = text;
    el.className = "pill " + (cls || "");
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = Object.assign({ Authorization: "Bearer " + token }, opts.headers || {});
    const resp = await fetch(BASE + path, opts);
    if (resp.status === 401 || resp.status === 403) {
      logout("The admin token was refused (" + resp.status + ").");
      throw new Error("unauthorized");
    }
    if (!resp.ok) {
      let detail = "";
      try {
        detail = (await resp.json()).detail.message;
      } catch (_) {
        /* not JSON */
      }
      throw new Error(resp.status + " " + detail);
    }
    return resp.json();
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function serverNow() {
    return Date.now() + serverOffsetMs;
  }

  function hhmmss(iso) {
    const t = new Date(iso);
    return isNaN(t) ? iso : t.toISOString().slice(11, 19);
  }

  // ---- pool chart, counts, lag -----------------------------------------------------------------

  function drawPool(stats) {
    const width = 360, height = 170, top = 16, bottom = 34, left = 8;
    const max = Math.max(1, ...STATUSES.map((s) => stats[s] || 0));
    const slot = (width - left) / STATUSES.length;
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, "data-total": stats.total });
    root.appendChild(svg("line", { x1: 0, x2: width, y1: height - bottom, y2: height - bottom, class: "axis" }));
    STATUSES.forEach((status, i) => {
      const value = stats[status] || 0;
      const h = Math.round(((height - top - bottom) * value) / max);
      const x = left + i * slot + slot * 0.15;
      const w = slot * 0.7;
      const bar = svg("rect", {
        x, y: height - bottom - h, width: w, height: h, class: "bar-" + status, "data-status": status, "data-value": value,
      });
      bar.appendChild(svg("title", {}, `${status}: ${value}`));
      root.appendChild(bar);
      root.appendChild(svg("text", { x: x + w / 2, y: height - bottom - h - 4, "text-anchor": "middle", class: "value" }, value));
      root.appendChild(svg("text", { x: x + w / 2, y: height - bottom + 14, "text-anchor": "middle" }, status.replace("_", " ").replace("deletion", "del.")));
    });
    $("pool-chart").replaceChildren(root);
  }

  async function refreshStats() {
    const stats = await api("/admin/stats");
    for (const s of STATUSES) $("count-" + s).textContent = String(stats[s]);
    $("count-total").textContent = String(stats.total);
    drawPool(stats);
    const lag = stats.projector_lag_ms;
    $("lag").textContent = lag === null || lag === undefined ? "external" : lag + " ms";
    $("lag").setAttribute("data-lag-ms", lag === null || lag === undefined ? "" : String(lag));
    $("updated").textContent = new Date().toISOString().slice(11, 19) + " UTC";
    if (typeof lag === "number") {
      lagSamples.push([Date.now(), lag]);
      while (lagSamples.length && lagSamples[0][0] < Date.now() - LAG_WINDOW_MS) lagSamples.shift();
      drawLag();
    }
    drawPrefixes(stats.by_prefix || {}, stats.low_water || []);
    drawReservations(stats.reservations || []);
    document.body.setAttribute("data-stats-loaded", "true");
  }

  function drawPrefixes(byPrefix, lowWater) {
    const low = new Map(lowWater.map((g) => [g.prefix, g]));
    const tbody = $("prefixes").querySelector("tbody");
    tbody.replaceChildren();
    const names = new Set([...Object.keys(byPrefix), ...low.keys()]);
    for (const prefix of [...names].sort()) {
      const counts = byPrefix[prefix] || {};
      const g = low.get(prefix);
      const tr = el("tr", { "data-prefix": prefix, class: g ? "low" : "" });
      tr.appendChild(el("td", {}, prefix === "" ? "(no prefix)" : prefix));
      for (const s of ["available", "allocated", "pending_deletion", "stale", "deletion_failed"]) {
        tr.appendChild(el("td", { "data-status": s }, String(counts[s] || 0)));
      }
      tr.appendChild(el("td", {}, g ? `below ${g.threshold}` : ""));
      tbody.appendChild(tr);
    }
  }

  // Reservations not yet closed, from the same GET {base}/admin/stats (reservations).
  function drawReservations(reservations) {
    const tbody = $("reservations").querySelector("tbody");
    tbody.replaceChildren();
    for (const r of reservations) {
      const tr = el("tr", { "data-reservation": r.reservation_id, class: r.shortfall > 0 ? "low" : "" });
      tr.appendChild(el("td", {}, r.track + (r.prefix ? " (" + r.prefix + "…)" : "")));
      tr.appendChild(el("td", {}, r.starts_at.slice(0, 16).replace("T", " ") + " – " + r.ends_at.slice(11, 16)));
      tr.appendChild(el("td", {}, r.state));
      for (const field of ["count", "free", "used", "lost", "shortfall"]) {
        tr.appendChild(el("td", { "data-field": field }, String(r[field])));
      }
      tbody.appendChild(tr);
    }
    $("reservations-empty").hidden = reservations.length > 0;
  }

  function drawLag() {
    const width = 360, height = 90, top = 10, bottom = 16, left = 40;
    const now = Date.now();
    const max = Math.max(100, ...lagSamples.map((p) => p[1]));
    const x = (t) => left + ((width - left) * (t - (now - LAG_WINDOW_MS))) / LAG_WINDOW_MS;
    const y = (v) => height - bottom - ((height - top - bottom) * v) / max;
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, "data-samples": lagSamples.length });
    root.appendChild(svg("line", { x1: left, x2: width, y1: height - bottom, y2: height - bottom, class: "axis" }));
    root.appendChild(svg("text", { x: left - 4, y: top + 4, "text-anchor": "end" }, max + " ms"));
    root.appendChild(svg("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, "0"));
    root.appendChild(svg("text", { x: left, y: height - 2, "text-anchor": "start" }, "-30m"));
    root.appendChild(svg("text", { x: width, y: height - 2, "text-anchor": "end" }, "now"));
    if (lagSamples.length) {
      const points = lagSamples.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      root.appendChild(svg("polyline", { points, class: "lag-line" }));
    }
    $("lag-chart").replaceChildren(root);
  }

  // ---- allocation outcomes (counted by the server) ----------------------------------------------

  // One bar group's count: the sum of its server outcomes (`rate_limited` is its own field).
  function barCount(counts, rateLimited, names) {
    return names.reduce((sum, n) => sum + (n === "rate_limited" ? rateLimited || 0 : counts[n] || 0), 0);
  }

  async function refreshOutcomes() {
    const body = await api("/admin/outcomes");
    if (body.now) serverOffsetMs = new Date(body.now).getTime() - Date.now();
    $("outcomes-since").textContent = body.since ? "at " + body.since.slice(0, 16).replace("T", " ") + " UTC" : "";
    const totals = $("outcome-totals");
    totals.replaceChildren();
    for (const [key, label, names] of OUTCOME_BARS) {
      const n = barCount(body.totals || {}, body.rate_limited, names);
      const row = el("div", { "data-outcome": key });
      row.appendChild(el("dt", {}, label));
      row.appendChild(el("dd", { "data-value": String(n) }, String(n)));
      totals.appendChild(row);
    }
    drawOutcomes(body.per_minute || [], body.now ? new Date(body.now).getTime() : serverNow());
    document.body.setAttribute("data-outcomes-loaded", "true");
  }

  function drawOutcomes(perMinute, nowMs) {
    const width = 360, height = 170, top = 16, bottom = 24, left = 24;
    const minute = Math.floor(nowMs / 60000) * 60000;
    const byMinute = new Map(perMinute.map((m) => [new Date(m.minute).getTime(), m]));
    const bins = [];
    for (let i = 59; i >= 0; i--) {
      const m = byMinute.get(minute - i * 60000);
      bins.push(Object.fromEntries(OUTCOME_BARS.map(([key, , names]) => [key, m ? barCount(m.counts || {}, m.rate_limited, names) : 0])));
    }
    const totals = bins.map((b) => OUTCOME_BARS.reduce((sum, [key]) => sum + b[key], 0));
    const max = Math.max(1, ...totals);
    const slot = (width - left) / 60;
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}` });
    root.appendChild(svg("line", { x1: left, x2: width, y1: height - bottom, y2: height - bottom, class: "axis" }));
    root.appendChild(svg("text", { x: left - 4, y: top + 4, "text-anchor": "end" }, max));
    root.appendChild(svg("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, 0));
    bins.forEach((bin, i) => {
      let base = height - bottom;
      for (const [key, label] of OUTCOME_BARS) {
        if (!bin[key]) continue;
        const h = Math.max(1, Math.round(((height - top - bottom) * bin[key]) / max));
        base -= h;
        const bar = svg("rect", { x: left + i * slot + 0.5, y: base, width: Math.max(1, slot - 1), height: h, class: "bar-" + key, "data-minute": i - 59, "data-outcome": key, "data-value": bin[key] });
        bar.appendChild(svg("title", {}, `${59 - i} min ago: ${bin[key]} × ${label}`));
        root.appendChild(bar);
      }
    });
    for (const [i, label] of [[0, "-60m"], [30, "-30m"], [59, "now"]]) {
      const anchor = i === 0 ? "start" : i === 59 ? "end" : "middle";
      root.appendChild(svg("text", { x: left + (i === 59 ? 60 : i) * slot, y: height - 6, "text-anchor": anchor }, label));
    }
    $("outcomes-chart").replaceChildren(root);
  }

  // ---- usage by day (GET /admin/usage, folded from the event log) -------------------------------

  const USAGE_DAYS = 14;
  const USAGE_EVERY_MS = 300000;

  async function refreshUsage() {
    const dayMs = 86400000;
    const today = Math.floor(serverNow() / dayMs) * dayMs;
    const from = new Date(today - (USAGE_DAYS - 1) * dayMs).toISOString().slice(0, 10);
    const body = await api("/admin/usage?group_by=day&from=" + from);
    const byDay = new Map((body.groups || []).map((g) => [g.group, g]));
    const days = [];
    for (let i = USAGE_DAYS - 1; i >= 0; i--) {
      const day = new Date(today - i * dayMs).toISOString().slice(0, 10);
      const g = byDay.get(day);
      days.push({ day, allocations: g ? g.allocations : 0, hours: g ? g.sandbox_hours : 0 });
    }
    const totals = body.totals || {};
    $("usage-allocations").textContent = String(totals.allocations || 0);
    $("usage-allocations").setAttribute("data-total", String(totals.allocations || 0));
    $("usage-hours").textContent = String(totals.sandbox_hours || 0);
    $("usage-reclaims").textContent = String(totals.reclaims || 0);
    drawUsage(days);
    document.body.setAttribute("data-usage-loaded", "true");
  }

  function drawUsage(days) {
    const width = 360, height = 150, top = 16, bottom = 24, left = 24;
    const max = Math.max(1, ...days.map((d) => d.allocations));
    const slot = (width - left) / days.length;
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}` });
    root.appendChild(svg("line", { x1: left, x2: width, y1: height - bottom, y2: height - bottom, class: "axis" }));
    root.appendChild(svg("text", { x: left - 4, y: top + 4, "text-anchor": "end" }, max));
    root.appendChild(svg("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, 0));
    days.forEach((d, i) => {
      const h = d.allocations ? Math.max(1, Math.round(((height - top - bottom) * d.allocations) / max)) : 0;
      const bar = svg("rect", { x: left + i * slot + 1, y: height - bottom - h, width: Math.max(1, slot - 2), height: h, class: "bar-o201", "data-day": d.day, "data-value": d.allocations });
      bar.appendChild(svg("title", {}, `${d.day}: ${d.allocations} allocations, ${d.hours} sandbox-hours`));
      root.appendChild(bar);
    });
    for (const [i, anchor] of [[0, "start"], [days.length - 1, "end"]]) {
      const x = left + (i === 0 ? 0 : days.length) * slot;
      root.appendChild(svg("text", { x, y: height - 6, "text-anchor": anchor }, days[i].day.slice(5)));
    }
    $("usage-chart").replaceChildren(root);
  }

  // ---- admin jobs ------------------------------------------------------------------------------

  async function refreshJobs() {
    const body = await api("/admin/jobs");
    const tbody = $("admin-jobs").querySelector("tbody");
    tbody.replaceChildren();
    for (const job of body.jobs) {
      const tr = el("tr", { "data-job": job.job_id, "data-state": job.state });
      tr.appendChild(el("td", {}, job.job_id));
      tr.appendChild(el("td", {}, job.kind));
      tr.appendChild(el("td", {}, job.state));
      tr.appendChild(el("td", {}, job.total === null || job.total === undefined ? String(job.done) : `${job.done} / ${job.total}`));
      tr.appendChild(el("td", {}, String(job.errors)));
      tr.appendChild(el("td", {}, job.started_at ? hhmmss(job.started_at) : ""));
      tr.appendChild(el("td", {}, job.finished_at ? hhmmss(job.finished_at) : ""));
      tbody.appendChild(tr);
    }
    $("admin-jobs-empty").hidden = body.jobs.length > 0;
  }

  // ---- waiting lines ---------------------------------------------------------------------------

  async function refreshLines() {
    const body = await api("/admin/waiting-lines");
    const tbody = $("waiting-lines").querySelector("tbody");
    tbody.replaceChildren();
    for (const line of body.lines) {
      const tr = el("tr", { "data-waiting": String(line.waiting) });
      tr.appendChild(el("td", {}, line.track || "(any)"));
      tr.appendChild(el("td", {}, line.prefix || "(any)"));
      tr.appendChild(el("td", {}, String(line.waiting)));
      tbody.appendChild(tr);
    }
    $("waiting-lines-empty").hidden = body.lines.length > 0;
  }

  async function refreshControl() {
    const control = await api("/admin/pool");
    const whole = control.drains.find((d) => d.prefix === null);
    $("drain-state").textContent = whole ? "drained (maintenance)" : control.drains.length ? "open, some prefixes drained" : "open";
    const list = $("drains");
    list.textContent = "";
    for (const d of control.drains) {
      const since = new Date(d.since * 1000).toISOString().slice(0, 16).replace("T", " ");
      const what = d.prefix === null ? "the whole pool" : "names starting " + d.prefix;
      const li = el("li", { "data-prefix": d.prefix === null ? "" : d.prefix });
      li.appendChild(el("span", {}, `Drained: ${what}, since ${since} UTC` + (d.reason ? ` (${d.reason})` : "") + " "));
      const button = el("button", { type: "button", class: "secondary", "data-resume": d.prefix === null ? "" : d.prefix }, "Resume…");
      button.addEventListener("click", () => askResume(d.prefix));
      li.appendChild(button);
      list.appendChild(li);
    }
    document.body.setAttribute("data-drained", whole ? "true" : "false");
  }

  // A drain or a resume changes what every student gets: the page asks before it sends either.
  let pendingAction = null;

  function ask(text, confirmLabel, action) {
    pendingAction = action;
    $("confirm-text").textContent = text;
    $("confirm-yes").textContent = confirmLabel;
    $("confirm").hidden = false;
    $("confirm-no").focus();
  }

  function closeConfirm() {
    pendingAction = null;
    $("confirm").hidden = true;
  }

  function askDrain() {
    const prefix = $("drain-prefix").value.trim();
    const reason = $("drain-reason").value.trim();
    const what = prefix ? `every sandbox whose name starts with "${prefix}"` : "the whole pool";
    ask(
      `Drain allocation for ${what}? New allocations will be refused with 503 MAINTENANCE until you resume; students who already have a sandbox keep it.`,
      "Drain " + (prefix ? prefix : "the whole pool"),
      async () => {
        let path = "/admin/pool/drain";
        const params = [];
        if (prefix) params.push("prefix=" + encodeURIComponent(prefix));
        if (reason) params.push("reason=" + encodeURIComponent(reason));
        if (params.length) path += "?" + params.join("&");
        await api(path, { method: "POST" });
        $("drain-prefix").value = "";
        $("drain-reason").value = "";
      },
    );
  }

  function askResume(prefix) {
    const what = prefix === null ? "the whole pool" : `names starting "${prefix}"`;
    ask(`Resume allocation for ${what}? Students will get sandboxes again at once.`, "Resume " + (prefix === null ? "the whole pool" : prefix), async () => {
      await api("/admin/pool/resume" + (prefix === null ? "" : "?prefix=" + encodeURIComponent(prefix)), { method: "POST" });
    });
  }

  async function confirmPending() {
    const action = pendingAction;
    closeConfirm();
    if (!action) return;
    try {
      await action();
      showError("");
    } catch (e) {
      if (e.message !== "unauthorized") showError("pool control: " + e.message);
    }
    await refreshControl().catch(() => {});
  }

  function statsSoon() {
    if (statsPending) return;
    statsPending = setTimeout(() => {
      statsPending = null;
      refreshStats().catch((e) => showError("stats: " + e.message));
    }, 300);
  }

  // ---- allocations per minute ------------------------------------------------------------------

  function countAllocation(key, occurredAt) {
    if (allocationKeys.has(key)) return;
    allocationKeys.add(key);
    allocationTimes.push(new Date(occurredAt).getTime());
  }

  function drawAllocations() {
    const now = serverNow();
    const hourAgo = now - 60 * 60 * 1000;
    const bins = new Array(60).fill(0);
    let total = 0;
    for (const t of allocationTimes) {
      if (t <= hourAgo || t > now + 60000) continue;
      const idx = Math.min(59, Math.floor((t - hourAgo) / 60000));
      bins[idx] += 1;
      total += 1;
    }
    const width = 360, height = 170, top = 16, bottom = 24, left = 24;
    const max = Math.max(1, ...bins);
    const slot = (width - left) / 60;
    const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, "data-total": total });
    root.appendChild(svg("line", { x1: left, x2: width, y1: height - bottom, y2: height - bottom, class: "axis" }));
    root.appendChild(svg("text", { x: left - 4, y: top + 4, "text-anchor": "end" }, max));
    root.appendChild(svg("text", { x: left - 4, y: height - bottom, "text-anchor": "end" }, 0));
    bins.forEach((count, i) => {
      if (!count) return;
      const h = Math.max(1, Math.round(((height - top - bottom) * count) / max));
      const bar = svg("rect", { x: left + i * slot + 0.5, y: height - bottom - h, width: Math.max(1, slot - 1), height: h, class: "bar-alloc", "data-minute": i - 59, "data-value": count });
      bar.appendChild(svg("title", {}, `${59 - i} min ago: ${count}`));
      root.appendChild(bar);
    });
    for (const [i, label] of [[0, "-60m"], [30, "-30m"], [59, "now"]]) {
      const anchor = i === 0 ? "start" : i === 59 ? "end" : "middle";
      root.appendChild(svg("text", { x: left + (i === 59 ? 60 : i) * slot, y: height - 6, "text-anchor": anchor }, label));
    }
    $("alloc-chart").replaceChildren(root);
    $("alloc-total").textContent = String(total);
    $("alloc-total").setAttribute("data-total", String(total));
    $("alloc-current").textContent = String(bins[59]);
    $("alloc-current").setAttribute("data-count", String(bins[59]));
  }

  async function loadAllocations() {
    const since = new Date(serverNow() - 61 * 60 * 1000).toISOString();
    let cursor = null;
    for (let page = 0; page < 20; page++) {
      let path = "/admin/events?type=SandboxAllocated&limit=500&since=" + encodeURIComponent(since);
      if (cursor) path += "&cursor=" + encodeURIComponent(cursor);
      const body = await api(path);
      if (body.now) serverOffsetMs = new Date(body.now).getTime() - Date.now();
      for (const e of body.events) countAllocation(e.key, e.occurred_at);
      cursor = body.cursor;
      if (!cursor) break;
    }
    drawAllocations();
  }

  // ---- quarantine ------------------------------------------------------------------------------

  async function refreshQuarantine() {
    const body = await api("/admin/sandboxes?status=deletion_failed&limit=100");
    const tbody = $("quarantine").querySelector("tbody");
    tbody.replaceChildren();
    for (const s of body.sandboxes) {
      const tr = el("tr", { "data-sandbox": s.sandbox_id });
      tr.appendChild(el("td", {}, s.sandbox_id));
      tr.appendChild(el("td", {}, s.name));
      tr.appendChild(el("td", {}, String(s.deletion_attempts)));
      tr.appendChild(el("td", {}, s.last_error || ""));
      const cell = el("td");
      const button = el("button", { type: "button" }, "Retry deletion");
      button.addEventListener("click", () => retry(s.sandbox_id, button));
      cell.appendChild(button);
      tr.appendChild(cell);
      tbody.appendChild(tr);
    }
    $("quarantine-empty").hidden = body.sandboxes.length > 0;
  }

  async function retry(id, button) {
    button.disabled = true;
    try {
      await api("/admin/sandboxes/" + encodeURIComponent(id) + "/retry-deletion", { method: "POST" });
      showError("");
    } catch (e) {
      showError("retry " + id + ": " + e.message);
    }
    await refreshQuarantine().catch(() => {});
    statsSoon();
  }

  // ---- live feed, in words ----------------------------------------------------------------------

  const feedEvents = []; // newest first: {key, event}
  const names = new Map(); // sandbox id -> name
  const lookups = new Set(); // sandbox ids whose name is being (or was) asked for
  const jobKinds = new Map(); // admin job id -> kind
  let newestDrawn = null;
  let feedPending = null;

  const sandboxOf = (event) => (event.stream_id || "").startsWith("sandbox#") ? event.stream_id.slice("sandbox#".length) : null;

  function nameOf(id) {
    if (id === null || id === undefined) return "a sandbox";
    if (names.has(id)) return names.get(id);
    lookUpName(id);
    return id;
  }

  // The feed names sandboxes by id; the page shows names, asking the API once per unknown id.
  // The asks are paced (two at a time, a pause after each: at most about 20 a second), so that
  // a replay of a busy ten minutes stays well inside the admin token's rate limit, which the
  // page's other requests share; rows show the id until the name is known.
  const LOOKUPS_AT_ONCE = 2;
  const LOOKUP_PAUSE_MS = 100;
  const lookupQueue = [];
  let lookupsRunning = 0;

  function lookUpName(id) {
    if (lookups.has(id) || lookups.size > 2000) return;
    lookups.add(id);
    lookupQueue.push(id);
    pumpLookups();
  }

  function pumpLookups() {
    while (token && lookupsRunning < LOOKUPS_AT_ONCE && lookupQueue.length) {
      const id = lookupQueue.shift();
      lookupsRunning += 1;
      api("/admin/sandboxes/" + encodeURIComponent(id))
        .then((body) => {
          const name = body && body.state && body.state.name;
          if (name) {
            names.set(id, name);
            feedSoon();
          }
        })
        .catch(() => {})
        .finally(() =>
          setTimeout(() => {
            lookupsRunning -= 1;
            pumpLookups();
          }, LOOKUP_PAUSE_MS),
        );
    }
  }

  function who(actor) {
    if (!actor) return "";
    if (actor.startsWith("track:")) return actor.slice("track:".length);
    if (actor === "admin") return "operator";
    if (actor.startsWith("job:")) return actor.slice("job:".length) + " job";
    return actor;
  }

  // A time of day, with its date when that is not today (UTC), e.g. "2026-05-02 10:00 UTC".
  function at(iso) {
    const t = new Date(iso);
    if (!iso || isNaN(t)) return iso || "";
    const full = t.toISOString();
    const today = new Date(serverNow()).toISOString().slice(0, 10);
    return (full.slice(0, 10) === today ? "" : full.slice(0, 10) + " ") + full.slice(11, 16) + " UTC";
  }

  // One event as a sentence. `internal`: bookkeeping that repeats what another event says
  // (claims, quota slots), or progress no operator acts on; shown only on request.
  function describe(event) {
    const p = event.payload || {};
    const id = sandboxOf(event);
    const n = () => nameOf(id);
    const jobId = (event.stream_id || "").startsWith("adminjob#") ? event.stream_id.slice("adminjob#".length) : "";
    switch (event.event_type) {
      case "SandboxRegistered":
        return { text: `${p.name || n()} registered in the pool`, group: "registered" };
      case "SandboxAllocated":
        return { text: `${p.caller} got ${n()}` + (p.track_name ? ` (track ${p.track_name})` : "") + (p.expires_at ? `, until ${at(p.expires_at)}` : "") };
      case "DeletionRequested":
        if (p.reason === "heartbeat_missed") {
          return { text: `${n()} reclaimed from ${p.caller}: no heartbeat since ${at(p.last_heartbeat_at)}; queued for deletion` };
        }
        return { text: `${p.caller} released ${n()}; it is queued for deletion` };
      case "AllocationExpired":
        return { text: `${n()}: the lab ended (expired); queued for deletion` };
      case "LeaseExtended":
        return { text: `${p.caller} extended ${n()} by ${p.hours} h, until ${at(p.expires_at)}` };
      case "SandboxMarkedStale":
        return { text: `${n()} is missing from the CSP listing: marked stale` };
      case "SandboxRestored":
        return { text: `${n()} is listed by the CSP again: available` };
      case "DeletionLeased":
        return { text: `cleanup took ${n()} to delete it`, internal: true };
      case "DeletionAttemptFailed":
        return { text: `deleting ${n()} failed (attempt ${p.attempt}): ${p.error}; next try at ${at(p.next_attempt_at)}` };
      case "DeletionFailed":
        return { text: `${n()} quarantined after ${p.attempts} failed deletions: ${p.last_error}` };
      case "DeletionRetried":
        return { text: `${n()} re-queued for deletion` };
      case "SandboxDeleted":
        return { text: `${n()} deleted in the CSP` };
      case "SandboxRetired":
        return { text: `${n()} removed from the pool (${String(p.reason || "").replace(/_/g, " ")})` };
      case "ClaimGranted":
        return { text: `claim: ${p.caller} holds ${nameOf(p.sandbox_id)}`, internal: true };
      case "ClaimReleased":
        return { text: `claim: ${nameOf(p.sandbox_id)} released (${String(p.reason || "").replace(/_/g, " ")})`, internal: true };
      case "QuotaSlotTaken":
        return { text: `quota: ${nameOf(p.sandbox_id)} takes a slot (${(p.holders || []).length} of ${p.limit} in use)`, internal: true };
      case "QuotaSlotReleased":
        return { text: `quota: ${nameOf(p.sandbox_id)} frees its slot (${(p.holders || []).length} in use)`, internal: true };
      case "ListingRecorded":
        return { text: `sync read the CSP listing: ${p.listed} accounts` + ((p.missing || []).length ? `, ${p.missing.length} available ones missing` : "") };
      case "AdminJobListed":
        if (p.job_id) jobKinds.set(p.job_id, p.kind);
        return { text: `admin job ${p.kind} submitted`, internal: true };
      case "AdminJobStarted":
        if (jobId) jobKinds.set(jobId, p.kind);
        return { text: `admin job ${p.kind} started` + (typeof p.total === "number" ? ` (${p.total} to do)` : "") };
      case "AdminJobProgressed":
        return { text: `admin job ${jobKinds.get(jobId) || ""}: ${p.done} done, ${p.errors} errors so far`, internal: true };
      case "AdminJobFinished":
        return { text: `admin job ${jobKinds.get(jobId) || ""} ${p.outcome}: ${p.done} done, ${p.errors} errors` + (p.error ? ` (${p.error})` : "") };
      case "PoolDrained":
        return { text: (p.prefix ? `allocation drained for names starting ${p.prefix}` : "allocation drained for the whole pool") + (p.reason ? ` (${p.reason})` : "") };
      case "PoolResumed":
        return { text: p.prefix ? `allocation resumed for names starting ${p.prefix}` : "allocation resumed for the whole pool" };
      case "HeartbeatMissed":
        return { text: `${n()}: no heartbeat since ${at(p.last_heartbeat_at)}; reclaimed at ${at(p.reclaim_at)} unless one comes` };
      case "RefusalsSummarized":
        return { text: `refused allocations: ${(p.refusals || []).map((r) => `${r.count} × ${String(r.reason).replace(/_/g, " ")}` + (r.track ? ` (${r.track})` : "")).join(", ")}`, internal: true };
      default:
        return { text: `${event.event_type} (an event this page does not describe)` };
    }
  }

  function feedSoon() {
    if (feedPending) return;
    feedPending = setTimeout(() => {
      feedPending = null;
      drawFeed();
    }, 50);
  }

  // Redraws the table from the kept events: internal ones left out unless asked for, runs of
  // registrations (a sync of a whole pool) as one row.
  function drawFeed() {
    const showInternal = $("show-internal").checked;
    const rows = [];
    let hidden = 0;
    for (const { key, event } of feedEvents) {
      const d = describe(event);
      if (d.internal && !showInternal) {
        hidden += 1;
        continue;
      }
      const last = rows[rows.length - 1];
      const name = (event.payload || {}).name || "";
      if (d.group && last && last.group === d.group) {
        last.count += 1;
        last.names.push(name);
        continue;
      }
      rows.push({ key, event, text: d.text, group: d.group, internal: !!d.internal, count: 1, names: [name] });
      if (rows.length > FEED_ROWS) break;
    }
    const tbody = $("feed").querySelector("tbody");
    tbody.replaceChildren();
    for (const row of rows.slice(0, FEED_ROWS)) {
      const e = row.event;
      let text = row.text;
      if (row.group === "registered" && row.count > 1) {
        // Registered concurrently, so not in name order: the range shows the first and last name.
        const sorted = row.names.filter(Boolean).sort();
        text = `${row.count} sandboxes registered in the pool (${sorted[0] || ""} … ${sorted[sorted.length - 1] || ""})`;
      }
      const attrs = { "data-type": e.event_type, "data-stream": e.stream_id, "data-key": row.key, "data-count": String(row.count) };
      const id = sandboxOf(e);
      if (id) attrs["data-sandbox"] = id;
      const classes = [];
      if (newestDrawn !== null && row.key > newestDrawn) classes.push("fresh");
      if (row.internal) classes.push("internal");
      if (classes.length) attrs.class = classes.join(" ");
      const tr = el("tr", attrs);
      tr.appendChild(el("td", {}, hhmmss(e.occurred_at)));
      tr.appendChild(el("td", { class: "what" }, text));
      tr.appendChild(el("td", {}, who(e.actor)));
      tbody.appendChild(tr);
    }
    if (feedEvents.length) newestDrawn = feedEvents[0].key;
    $("internal-count").textContent = String(hidden);
  }

  function onEvent(id, data) {
    lastEventId = id;
    let event;
    try {
      event = JSON.parse(data);
    } catch (_) {
      return;
    }
    if (event.event_type === "SandboxRegistered" && event.payload && event.payload.name) {
      const sid = sandboxOf(event);
      if (sid) names.set(sid, event.payload.name);
    }
    feedEvents.unshift({ key: event.key || id, event });
    if (feedEvents.length > FEED_KEEP) feedEvents.length = FEED_KEEP;
    feedSoon();
    if (event.event_type === "SandboxAllocated") {
      countAllocation(event.key || id, event.occurred_at);
      drawAllocations();
    }
    if (event.stream_id && event.stream_id.startsWith("sandbox#")) statsSoon();
    if (event.event_type === "PoolDrained" || event.event_type === "PoolResumed") {
      refreshControl().catch(() => {});
    }
    if (event.event_type === "DeletionFailed" || event.event_type === "DeletionRetried") {
      refreshQuarantine().catch(() => {});
    }
  }

  // Parses a text/event-stream body: frames end with a blank line; `id:` and `data:` fields,
  // `:` comments (heartbeats) ignored.
  async function readStream(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let id = null;
        const data = [];
        for (const line of frame.split("\n")) {
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let v = colon < 0 ? "" : line.slice(colon + 1);
          if (v.startsWith(" ")) v = v.slice(1);
          if (field === "id") id = v;
          else if (field === "data") data.push(v);
        }
        if (id !== null && data.length) onEvent(id, data.join("\n"));
      }
    }
  }

  async function connectStream() {
    const controller = new AbortController();
    stream = controller;
    // First connection: replay the last 10 minutes so the table is not empty; afterwards resume
    // after the last event received.
    const resumeFrom = lastEventId || new Date(serverNow() - 10 * 60 * 1000).toISOString();
    try {
      const resp = await fetch(BASE + "/admin/events/stream", {
        headers: { Authorization: "Bearer " + token, "Last-Event-ID": resumeFrom, Accept: "text/event-stream" },
        signal: controller.signal,
        cache: "no-store",
      });
      if (resp.status === 401 || resp.status === 403) {
        logout("The admin token was refused (" + resp.status + ").");
        return;
      }
      if (!resp.ok || !resp.body) throw new Error("stream answered " + resp.status);
      setConn("live", "live");
      document.body.setAttribute("data-stream", "live");
      await readStream(resp.body);
    } catch (e) {
      if (controller.signal.aborted) return;
    }
    if (stream !== controller || controller.signal.aborted) return;
    setConn("reconnecting…", "down");
    document.body.setAttribute("data-stream", "down");
    setTimeout(() => {
      if (stream === controller) connectStream();
    }, RECONNECT_MS);
  }

  // ---- session -----------------------------------------------------------------------------------

  async function start() {
    $("login").hidden = true;
    $("welcome").hidden = true;
    $("session").hidden = false;
    $("main").hidden = false;
    setConn("connecting…");
    showError("");
    try {
      await refreshStats();
      await refreshControl();
      await loadAllocations();
      await refreshQuarantine();
      await refreshJobs();
      await refreshOutcomes();
      await refreshUsage();
    } catch (e) {
      if (e.message !== "unauthorized") showError("loading: " + e.message);
      if (!token) return;
    }
    connectStream();
    timers.push(setInterval(() => refreshStats().catch((e) => showError("stats: " + e.message)), STATS_EVERY_MS));
    timers.push(setInterval(() => refreshControl().catch(() => {}), STATS_EVERY_MS));
    timers.push(setInterval(() => refreshQuarantine().catch(() => {}), QUARANTINE_EVERY_MS));
    timers.push(setInterval(drawAllocations, 30000));
    timers.push(setInterval(() => refreshJobs().catch(() => {}), STATS_EVERY_MS));
    timers.push(setInterval(() => refreshOutcomes().catch(() => {}), OUTCOMES_EVERY_MS));
    timers.push(setInterval(() => refreshUsage().catch(() => {}), USAGE_EVERY_MS));
    refreshLines().catch(() => {});
    timers.push(setInterval(() => refreshLines().catch(() => {}), STATS_EVERY_MS));
  }

  function logout(message) {
    token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    if (stream) stream.abort();
    stream = null;
    timers.forEach(clearInterval);
    timers = [];
    for (const id of lookupQueue) lookups.delete(id); // asked again after the next login
    lookupQueue.length = 0;
    $("login").hidden = false;
    $("welcome").hidden = false;
    $("session").hidden = true;
    $("main").hidden = true;
    closeConfirm();
    showError(message || "");
  }

  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    token = $("token").value.trim();
    $("token").value = "";
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    start();
  });
  $("logout").addEventListener("click", () => logout(""));
  $("drain-form").addEventListener("submit", (e) => {
    e.preventDefault();
    askDrain();
  });
  $("confirm-yes").addEventListener("click", () => confirmPending());
  $("confirm-no").addEventListener("click", closeConfirm);
  $("show-internal").addEventListener("change", drawFeed);
  if (token) start();
})();
