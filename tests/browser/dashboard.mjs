// Loads the broker's dashboard in headless Chromium (Debian's, never a downloaded browser) and
// checks it as an operator would see it. Run by scripts/browser-test.sh, which starts the API.
//
// Environment: BASE_URL (http://127.0.0.1:PORT), ADMIN_TOKEN, TRACK_TOKEN, SCREENSHOT (png path),
// CHROMIUM (default /usr/bin/chromium), API_BASE (default /v1).
// Exit code: 0 when every check passed, 1 otherwise. Every wait is bounded.

import { execFileSync } from "node:child_process";
import { chromium } from "playwright-core";

const BASE_URL = mustEnv("BASE_URL");
const ADMIN_TOKEN = mustEnv("ADMIN_TOKEN");
const TRACK_TOKEN = mustEnv("TRACK_TOKEN");
const SCREENSHOT = process.env.SCREENSHOT || "artifacts/dashboard.png";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const API = BASE_URL + (process.env.API_BASE || "/v1");
const STATUSES = ["available", "allocated", "pending_deletion", "stale", "deletion_failed", "deleted", "total"];
const WAIT_MS = 20000;

let failures = 0;
function mustEnv(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`dashboard.mjs: ${name} is not set`);
    process.exit(1);
  }
  return v;
}
function check(ok, what, detail) {
  if (ok) console.log(`ok - ${what}`);
  else {
    failures += 1;
    console.log(`not ok - ${what}${detail ? ": " + detail : ""}`);
  }
  return ok;
}

async function stats() {
  const resp = await fetch(API + "/admin/stats", { headers: { Authorization: "Bearer " + ADMIN_TOKEN } });
  if (!resp.ok) throw new Error("stats answered " + resp.status);
  return resp.json();
}

async function shownCounts(page) {
  const counts = {};
  for (const s of STATUSES) counts[s] = (await page.textContent("#count-" + s)).trim();
  return counts;
}

// Polls until the page shows exactly the API's figures (the page refreshes them every 5 s and
// after live events), bounded.
async function countsMatch(page, label) {
  const deadline = Date.now() + WAIT_MS;
  let shown, truth;
  while (Date.now() < deadline) {
    truth = await stats();
    shown = await shownCounts(page);
    if (STATUSES.every((s) => shown[s] === String(truth[s]))) break;
    await page.waitForTimeout(250);
  }
  const same = STATUSES.every((s) => shown[s] === String(truth[s]));
  check(same, `${label}: pool counts on the page equal /v1/admin/stats`, JSON.stringify({ shown, truth }));
  const bars = await page.$$eval("#pool-chart rect", (rects) =>
    Object.fromEntries(rects.map((r) => [r.getAttribute("data-status"), r.getAttribute("data-value")])),
  );
  check(
    STATUSES.filter((s) => s !== "total").every((s) => bars[s] === String(truth[s])),
    `${label}: the pool chart's bars carry the same numbers`,
    JSON.stringify(bars),
  );
  return truth;
}

async function admin(method, path) {
  const resp = await fetch(API + path, { method, headers: { Authorization: "Bearer " + ADMIN_TOKEN } });
  const body = await resp.json().catch(() => null);
  return { status: resp.status, body };
}

// Waits (bounded) until `probe` returns a truthy value in the page; reports it as one check.
async function waitInPage(page, what, probe, arg, timeout = WAIT_MS) {
  try {
    await page.waitForFunction(probe, arg, { timeout, polling: 250 });
    return check(true, what);
  } catch (e) {
    return check(false, what, e.message);
  }
}

// The prefix group of a name: the name without its last `-`-separated segment (ADR 0018).
function groupOf(name) {
  const cut = name.lastIndexOf("-");
  return cut < 0 ? "" : name.slice(0, cut);
}

function allocate(caller, want = "201") {
  // curl, as a track script would call the broker.
  const out = execFileSync(
    "curl",
    [
      "-sS", "--max-time", "10", "-X", "POST", API + "/allocate",
      "-H", "Authorization: Bearer " + TRACK_TOKEN,
      "-H", "X-Instruqt-Sandbox-ID: " + caller,
      "-w", "\n%{http_code}",
    ],
    { encoding: "utf8" },
  );
  const [body, status] = [out.slice(0, out.lastIndexOf("\n")), out.slice(out.lastIndexOf("\n") + 1)];
  check(status === want, `allocation with the track token (curl) is ${want}`, `${status} ${body}`);
  return JSON.parse(body);
}

// The number the outcomes card shows for one bar group (o201, o200, o503, …).
async function shownOutcome(page, key) {
  return Number(await page.getAttribute(`#outcome-totals div[data-outcome="${key}"] dd`, "data-value"));
}

// Every visible cell text of the live table.
async function feedTexts(page) {
  return page.$$eval("#feed tbody td", (cells) => cells.map((c) => c.textContent));
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
  ],
});
const problems = [];
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 1000 } });
  const page = await context.newPage();
  page.on("console", (msg) => {
    if (msg.type() === "error") problems.push("console: " + msg.text());
  });
  page.on("pageerror", (err) => problems.push("page error: " + err.message));
  page.on("request", (req) => {
    if (!req.url().startsWith(BASE_URL)) problems.push("request outside the broker: " + req.url());
  });

  // The service names its dashboard at its root.
  const root = await (await fetch(BASE_URL + "/")).json();
  check(root.dashboard === "/dashboard", "GET / names /dashboard", JSON.stringify(root));

  // Allocations answered before any page is open: the outcomes card must still show them,
  // because the server counts them, not the page.
  const early = "browser-test-early-" + Date.now();
  allocate(early);
  allocate(early, "200");

  const resp = await page.goto(BASE_URL + "/dashboard", { waitUntil: "load", timeout: WAIT_MS });
  check(resp && resp.status() === 200, "GET /dashboard is 200");
  const csp = (resp && resp.headers()["content-security-policy"]) || "";
  check(csp.includes("script-src 'self'") && csp.includes("connect-src 'self'"), "the page has the dashboard CSP", csp);
  check(await page.isVisible("#login"), "the page asks for the admin token");
  const hint = (await page.textContent("#token-hint")) || "";
  check(
    (await page.isVisible("#token-hint")) && hint.includes("start-up banner") && hint.includes("admin: dev-admin-token-"),
    "before login the page says where the admin token comes from (the banner, in dev mode)",
    hint,
  );
  check(!hint.includes(ADMIN_TOKEN), "the hint does not contain the token itself");

  await page.fill("#token", ADMIN_TOKEN);
  await page.click("#login button[type=submit]");
  await page.waitForSelector("body[data-stats-loaded=true]", { timeout: WAIT_MS });
  await page.waitForSelector("body[data-stream=live]", { timeout: WAIT_MS });
  check(true, "the dashboard loaded its figures and connected the live stream");
  check(await page.isHidden("#welcome"), "the login explanation is gone once connected");
  await page.waitForSelector("body[data-outcomes-loaded=true]", { timeout: WAIT_MS });
  check(
    (await shownOutcome(page, "o201")) >= 1 && (await shownOutcome(page, "o200")) >= 1,
    "the outcomes card shows the 201 and the 200 answered before the page opened (server-side counters)",
    `201: ${await shownOutcome(page, "o201")}, 200: ${await shownOutcome(page, "o200")}`,
  );
  check(/at \d{4}-\d\d-\d\d \d\d:\d\d UTC/.test((await page.textContent("#outcomes-since")) || ""), "the outcomes card says since when it counts", await page.textContent("#outcomes-since"));
  const stored = await page.evaluate(() => Object.keys(sessionStorage).length === 1 && Object.keys(localStorage).length === 0);
  check(stored, "the token is kept in sessionStorage only");

  const before = await countsMatch(page, "before the allocation");
  const lag = (await page.textContent("#lag")).trim();
  check(/^\d+ ms$/.test(lag) || lag === "external", "projector lag is shown", lag);
  check(
    (await page.isVisible("#reservations")) && (await page.isVisible("#reservations-empty")),
    "the reservations panel is shown, empty without reservations",
  );
  const beforeTotal = Number(await page.getAttribute("#alloc-total", "data-total"));

  const caller = "browser-test-" + Date.now();
  const allocation = allocate(caller);
  const sandboxId = allocation.sandbox_id;
  const row = `#feed tbody tr[data-type="SandboxAllocated"][data-stream="sandbox#${sandboxId}"]`;
  try {
    await page.waitForSelector(row, { timeout: WAIT_MS });
    check(true, "the live table shows the new allocation");
  } catch (e) {
    check(false, "the live table shows the new allocation", e.message);
  }
  // In words, with the sandbox's name (the feed carries only its id).
  await waitInPage(
    page,
    `the live table says "${caller} got ${allocation.name}"`,
    ([sel, words]) => (document.querySelector(sel)?.textContent || "").includes(words),
    [row, `${caller} got ${allocation.name}`],
  );
  const texts = await feedTexts(page);
  const keys = texts.filter((t) => /(claim|quota|sandbox|adminjob|pool)#/.test(t));
  check(keys.length === 0, "no internal stream key is shown in the live table", keys.join(" | "));
  check(
    (await page.$$('#feed tbody tr[data-type="ClaimGranted"], #feed tbody tr[data-type="QuotaSlotTaken"]')).length === 0,
    "claim and quota bookkeeping is hidden by default",
  );
  const registrations = await page.$$eval('#feed tbody tr[data-type="SandboxRegistered"]', (rows) =>
    rows.map((r) => [Number(r.getAttribute("data-count")), r.querySelector("td.what")?.textContent || ""]),
  );
  check(
    registrations.length >= 1 && registrations.length <= 2 && registrations.some(([n, t]) => n === 50 && t === "50 sandboxes registered in the pool (lab-demo-001 … lab-demo-050)"),
    "the demo pool's 50 registrations are one row naming the first and last sandbox, not a row each",
    JSON.stringify(registrations),
  );
  await page.check("#show-internal");
  await waitInPage(
    page,
    "asked for, the internal events show, in words",
    (sandbox) => {
      const claim = [...document.querySelectorAll('#feed tbody tr[data-type="ClaimGranted"]')].find((r) => r.textContent.includes("holds"));
      return !!claim && !claim.textContent.includes("#") && !!sandbox;
    },
    sandboxId,
  );
  await page.uncheck("#show-internal");
  await waitInPage(page, "and hide again", () => document.querySelectorAll('#feed tbody tr.internal').length === 0, null);
  try {
    await page.waitForFunction(
      (n) => Number(document.getElementById("alloc-total").getAttribute("data-total")) >= n,
      beforeTotal + 1,
      { timeout: WAIT_MS },
    );
    check(true, "the allocations-per-minute chart counted it");
  } catch (e) {
    check(false, "the allocations-per-minute chart counted it", e.message);
  }
  check((await page.$$("#alloc-chart rect.bar-alloc")).length > 0, "the allocations chart draws a bar");
  const after = await countsMatch(page, "after the allocation");
  check(after.allocated === before.allocated + 1, "the API itself counts one more allocated sandbox", `${before.allocated} -> ${after.allocated}`);
  check(
    (await page.$$("#quarantine-empty:not([hidden]), #quarantine tbody tr")).length > 0,
    "the quarantine section is rendered (a table row or 'None.')",
  );

  // Pool by prefix: the allocated sandbox's group shows the API's per-prefix counts.
  const group = groupOf(allocation.name || "");
  const truth = (await stats()).by_prefix?.[group] || {};
  check(Number(truth.allocated) >= 1, `/v1/admin/stats counts the allocation in group "${group}"`, JSON.stringify(truth));
  await waitInPage(
    page,
    `the prefix table shows group "${group}" with the API's counts`,
    ([g, want]) => {
      const row = [...document.querySelectorAll("#prefixes tbody tr")].find((r) => r.getAttribute("data-prefix") === g);
      if (!row) return false;
      const cell = (s) => row.querySelector(`td[data-status="${s}"]`)?.textContent;
      return cell("allocated") === String(want.allocated) && cell("available") === String(want.available);
    },
    [group, { allocated: truth.allocated || 0, available: truth.available || 0 }],
  );

  // Outcomes per minute: /metrics is read every 15 s and charted as increments, so the 201 of the
  // allocation above shows after the next read.
  await waitInPage(
    page,
    "the outcomes chart draws the 201 of the allocation",
    () => [...document.querySelectorAll('#outcomes-chart rect[data-outcome="o201"]')].some((r) => Number(r.getAttribute("data-value")) >= 1),
    null,
    40000,
  );

  // Projector lag chart: one sample per stats poll (every 5 s), drawn as a line once there are two.
  await waitInPage(
    page,
    "the lag chart plots the projector lag samples",
    () => Number(document.querySelector("#lag-chart svg")?.getAttribute("data-samples")) >= 2 && !!document.querySelector("#lag-chart polyline"),
    null,
    30000,
  );

  // Admin jobs: a bulk delete of stale sandboxes (none here: nothing is removed) shows as a row,
  // first running or already completed, then completed with its progress.
  const job = await admin("POST", "/admin/bulk-delete?status=stale");
  check(job.status === 202 && job.body && job.body.job_id, "bulk delete answers 202 with a job id", JSON.stringify(job));
  const jobId = job.body?.job_id || "";
  await waitInPage(
    page,
    "the admin jobs table shows the job completed",
    (id) => {
      const row = document.querySelector(`#admin-jobs tbody tr[data-job="${id}"]`);
      return !!row && row.getAttribute("data-state") === "completed" && row.children[1]?.textContent === "bulk_delete";
    },
    jobId,
  );
  check(await page.isHidden("#admin-jobs-empty"), "the jobs table's 'None.' is hidden once a job exists");

  // Drain and resume from the page, each only after its confirmation.
  const drainPrefix = "browser-test-drain";
  const pool = async () => (await admin("GET", "/admin/pool")).body || { drains: [] };
  await page.fill("#drain-prefix", drainPrefix);
  await page.fill("#drain-reason", "browser");
  await page.click("#drain-form button[type=submit]");
  check(await page.isVisible("#confirm"), "Drain… asks for a confirmation first");
  check(((await page.textContent("#confirm-text")) || "").includes(drainPrefix), "the confirmation names what is drained", await page.textContent("#confirm-text"));
  await page.click("#confirm-no");
  check(await page.isHidden("#confirm"), "Cancel closes the confirmation");
  check((await pool()).drains.length === 0, "a cancelled drain drained nothing", JSON.stringify(await pool()));
  await page.click("#drain-form button[type=submit]");
  await page.click("#confirm-yes");
  await waitInPage(
    page,
    "a confirmed prefix drain is listed under Allocation",
    (p) => !!document.querySelector(`#drains li[data-prefix="${p}"]`) && document.getElementById("drain-state").textContent.includes("some prefixes drained"),
    drainPrefix,
  );
  check((await pool()).drains.some((d) => d.prefix === drainPrefix && d.reason === "browser"), "the API has the prefix drain with its reason", JSON.stringify(await pool()));
  await page.screenshot({ path: SCREENSHOT.replace(/\.png$/, "-drained.png"), fullPage: true });

  // The whole pool: allocation answers 503 MAINTENANCE until resumed, and the outcomes show it.
  await page.click("#drain-form button[type=submit]");
  check(((await page.textContent("#confirm-text")) || "").includes("the whole pool"), "an empty prefix drains the whole pool, and the confirmation says so");
  await page.click("#confirm-yes");
  await waitInPage(page, "the page shows the whole pool drained", () => document.getElementById("drain-state").textContent === "drained (maintenance)", null);
  check((await pool()).drained === true, "the API reports the whole pool drained");
  const refusedOut = execFileSync(
    "curl",
    ["-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", API + "/allocate", "-H", "Authorization: Bearer " + TRACK_TOKEN, "-H", "X-Instruqt-Sandbox-ID: browser-test-drained"],
    { encoding: "utf8" },
  );
  check(refusedOut === "503", "while drained, an allocation is 503", refusedOut);
  await waitInPage(
    page,
    "the outcomes card counts the 503 (drained)",
    () => Number(document.querySelector('#outcome-totals div[data-outcome="o503"] dd')?.getAttribute("data-value")) >= 1,
    null,
  );
  await page.click('#drains button[data-resume=""]');
  check(((await page.textContent("#confirm-text")) || "").startsWith("Resume allocation for the whole pool"), "Resume… asks first", await page.textContent("#confirm-text"));
  await page.click("#confirm-yes");
  await page.click(`#drains button[data-resume="${drainPrefix}"]`);
  await page.click("#confirm-yes");
  await waitInPage(
    page,
    "after both resumes the page shows allocation open",
    (p) => !document.querySelector(`#drains li[data-prefix="${p}"]`) && document.getElementById("drain-state").textContent === "open",
    drainPrefix,
  );
  check((await pool()).drains.length === 0, "the API has no drain left", JSON.stringify(await pool()));
  await waitInPage(
    page,
    "the live table says the pool was drained and resumed",
    () => {
      const t = document.getElementById("feed").textContent;
      return t.includes("allocation drained for the whole pool") && t.includes("allocation resumed for the whole pool");
    },
    null,
  );

  await page.screenshot({ path: SCREENSHOT, fullPage: true });
  check(true, `screenshot written to ${SCREENSHOT}`);
  check(problems.length === 0, "no console errors, CSP violations or outside requests", problems.join(" | "));
} catch (e) {
  check(false, "the browser run completed", e.stack || String(e));
} finally {
  await browser.close();
}
console.log(failures === 0 ? "browser test: all checks passed" : `browser test: ${failures} check(s) failed`);
process.exit(failures === 0 ? 0 : 1);
