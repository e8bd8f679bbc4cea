// The dashboard in a real browser (Debian chromium driven by playwright-core), against a
// running stack. Driven by `cli/tests/e2e.rs`, which starts ZooKeeper, the broker, an engine,
// the gateway and a live replay, then runs this script and talks to it line by line:
//   this script → stdout: one JSON object per line, {"event": …}
//   test → stdin: "go" to continue after an event it checks
// Environment: CLICKPULSE_E2E_URL (the gateway), CLICKPULSE_E2E_ACME, CLICKPULSE_E2E_GLOBEX,
// CLICKPULSE_E2E_ADMIN (tokens), CLICKPULSE_E2E_OUT (screenshot directory),
// CLICKPULSE_CHROMIUM (default /usr/bin/chromium).

import { mkdirSync } from "node:fs";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const base = env("CLICKPULSE_E2E_URL");
const out = env("CLICKPULSE_E2E_OUT");
mkdirSync(out, { recursive: true });

const lines = createInterface({ input: process.stdin });
const inbox = [];
let waiting = null;
let stdinClosed = false;
lines.on("line", (l) => (waiting ? (waiting(l), (waiting = null)) : inbox.push(l)));
// The test's end (a failed assertion included) closes stdin: the next checkpoint then stops
// the script, and the browser with it, instead of leaving them running.
lines.on("close", () => ((stdinClosed = true), waiting && (waiting(null), (waiting = null))));
const next = () =>
  inbox.length ? Promise.resolve(inbox.shift()) : stdinClosed ? Promise.resolve(null) : new Promise((r) => (waiting = r));
const report = (event, data = {}) => console.log(JSON.stringify({ event, ...data }));
async function checkpoint(event, data) {
  report(event, data);
  const reply = await next();
  if (reply === null) throw new Error(`the test went away after ${event}`);
  if (reply !== "go") throw new Error(`the test answered ${JSON.stringify(reply)} after ${event}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CLICKPULSE_CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  // This machine's network is closed: without these, Chromium keeps trying Google's hosts.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
const problems = [];

async function open(url, label) {
  const page = await context.newPage();
  page.on("pageerror", (e) => problems.push(`${label}: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && problems.push(`${label}: console: ${m.text()}`));
  await page.goto(url);
  return page;
}

const testid = (id) => `[data-testid="${id}"]`;

/** The sliding-window total the page shows, with the result it came from. */
async function shownWindow(page) {
  return page.$eval(testid("window-views"), (e) => ({
    shown: e.textContent,
    views: Number(e.dataset.raw),
    epoch: Number(e.dataset.epoch),
    seq: Number(e.dataset.seq),
    window_start_ms: Number(e.dataset.windowStart),
  }));
}

async function waitFilled(page) {
  await page.waitForSelector(`${testid("connection")}[data-state="live"]`, { timeout: 30_000 });
  // Charts fill: points in the page-views chart, bars in the top-N, a window total shown.
  await page.waitForFunction(
    () => {
      const n = (id) => Number(document.querySelector(`[data-testid="${id}"]`)?.dataset.points ?? 0);
      const w = document.querySelector('[data-testid="window-views"]');
      return n("chart-pageviews") >= 5 && n("chart-topn") >= 3 && n("chart-sessions") >= 2 && w?.dataset.seq;
    },
    undefined,
    { timeout: 60_000, polling: 200 },
  );
}

try {
  // 1. acme: charts fill, numbers change, and what is shown is what the engine sent.
  const acme = await open(`${base}/?token=${env("CLICKPULSE_E2E_ACME")}`, "acme");
  await waitFilled(acme);
  const samples = [await shownWindow(acme)];
  const changed = Date.now();
  while (samples.length < 4 && Date.now() - changed < 30_000) {
    await acme.waitForTimeout(300);
    const s = await shownWindow(acme);
    if (s.seq !== samples.at(-1).seq || s.epoch !== samples.at(-1).epoch) samples.push(s);
  }
  const tokenInUrl = acme.url().includes("token=");
  await acme.screenshot({ path: `${out}/dashboard.png` });
  await acme.setViewportSize({ width: 390, height: 844 });
  await acme.waitForTimeout(500);
  const overflow = await acme.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  await acme.screenshot({ path: `${out}/dashboard-phone.png`, fullPage: true });
  await acme.setViewportSize({ width: 1280, height: 800 });
  const acmeTenant = await acme.$eval(testid("tenant"), (e) => e.textContent);
  await checkpoint("acme", { samples, tokenInUrl, overflow, tenant: acmeTenant });

  // 2. A second acme tab, opened while the job runs, starts with the chart the first one has
  //    (the gateway sends the recent ticks as snapshots), not with one point.
  const acme2 = await open(`${base}/?token=${env("CLICKPULSE_E2E_ACME")}`, "acme-2");
  await acme2.waitForSelector(`${testid("connection")}[data-state="live"]`, { timeout: 30_000 });
  await acme2.waitForTimeout(3000);
  const chartOf = (page) =>
    page.$eval(testid("chart-pageviews"), (e) => ({ points: Number(e.dataset.points), snapshots: Number(e.dataset.snapshots) }));
  const [first, second] = [await chartOf(acme), await chartOf(acme2)];
  await acme2.close();
  report("second-tab", { first, second });

  // 3. globex in another tab sees only globex; acme's tab still only acme.
  const globex = await open(`${base}/?token=${env("CLICKPULSE_E2E_GLOBEX")}`, "globex");
  await waitFilled(globex);
  await globex.waitForTimeout(1000);
  const seen = async (page) => page.$eval("#app", (e) => e.dataset.tenants);
  report("globex", {
    tenant: await globex.$eval(testid("tenant"), (e) => e.textContent),
    globexSaw: await seen(globex),
    acmeSaw: await seen(acme),
  });

  // 4. The ops view shows both jobs running.
  const ops = await open(`${base}/?view=ops&token=${env("CLICKPULSE_E2E_ADMIN")}`, "ops");
  await ops.waitForSelector(`${testid("job-acme")}[data-state="running"]`, { timeout: 30_000 });
  await ops.waitForSelector(`${testid("job-globex")}[data-state="running"]`, { timeout: 30_000 });
  await ops.screenshot({ path: `${out}/ops.png`, fullPage: true });
  const jobs = await ops.$$eval(`${testid("jobs")} tbody tr`, (rows) =>
    rows.map((r) => [...r.querySelectorAll("td")].map((c) => c.textContent)),
  );
  await checkpoint("ops", { jobs });

  // 5. Close every acme tab: the ops view sees the job linger, then stop.
  await acme.close();
  const closed = Date.now();
  await ops.waitForSelector(`${testid("job-acme")}[data-state="idle"]`, { timeout: 60_000 });
  const globexState = await ops.$eval(testid("job-globex"), (e) => e.dataset.state);
  report("acme-stopped", { after_ms: Date.now() - closed, globexState, problems });
} catch (e) {
  // What each page showed when it failed, for the test's output and target/e2e/.
  const pages = await Promise.all(
    context.pages().map(async (p, i) => {
      await p.screenshot({ path: `${out}/failure-${i}.png` }).catch(() => {});
      return p
        .evaluate(() => ({
          url: location.href,
          app: { ...document.getElementById("app")?.dataset },
          connection: document.querySelector('[data-testid="connection"]')?.textContent,
          points: [...document.querySelectorAll("[data-points]")].map((e) => `${e.dataset.testid}=${e.dataset.points}`),
          window: { ...document.querySelector('[data-testid="window-views"]')?.dataset },
        }))
        .catch((err) => String(err));
    }),
  );
  report("failed", { error: String(e?.stack ?? e), problems, pages });
  process.exitCode = 1;
} finally {
  lines.close();
  await browser.close();
}
