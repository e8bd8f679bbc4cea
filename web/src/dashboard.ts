// The tenant dashboard: live charts of one tenant's results.

import { chart, timeLabel, type Chart } from "./charts";
import { Connection, type ConnState } from "./connection";
import { ago, el, fixed, int, pct, utc } from "./format";
import { STREAMS, type PageCount, type Result, type ServerMsg, type SessionStats, type Totals } from "./protocol";
import type { Claims } from "./token";

/** Event-time points kept per chart: a window's worth of 1-second ticks. */
const HISTORY = 300;
/** Frames per second at most: results can arrive far faster than anyone can read them. */
const RENDER_INTERVAL_MS = 250;
/**
 * Asked of the gateway, per stream. Rendering is capped above, so this only bounds messages:
 * high enough that a replay at up to 200x still delivers every 1-second page-view tick. The
 * gateway keeps a window of a series' ticks per client (`protocol::ws::SERIES_KEPT`), so a
 * job's first window, or the snapshots of a chart opened while the job runs, arrive whole
 * (300 ticks in 1.5 s at this rate); the chart shows a break only where a slow link made
 * the gateway conflate ticks away.
 */
const MAX_RATE_HZ = 200;

interface Tick {
  t: number;
  end: number;
  pages: PageCount[];
}

interface SessionPoint {
  t: number;
  active: number;
  fresh: number;
  returning: number;
}

class State {
  ticks: Tick[] = [];
  sessions: SessionPoint[] = [];
  lastSessions: (SessionStats & { seq: number }) | null = null;
  window: Result | null = null;
  topn: PageCount[] = [];
  topnWindow: [number, number] | null = null;
  totals: Totals | null = null;
  watermark: number | null = null;
  epoch = 0;
  /** The run shown (`protocol::results`): a job started afresh begins a new one. */
  run = 0;
  received = 0;
  /** Page-view ticks that came as snapshots (the chart a tab opens with). */
  tickSnapshots = 0;
  tenantsSeen = new Set<string>();
  dirty = true;

  apply(r: Result): void {
    this.received += 1;
    this.tenantsSeen.add(r.tenant);
    // A newer epoch is a new job: its sequence numbers start again, older ones are stale.
    if (r.epoch < this.epoch) return;
    this.epoch = r.epoch;
    // Runs only grow. A newer one is a job started afresh (the last viewer left, the job
    // stopped, someone came back): its windows and totals start again, and the last run's
    // charts would only stretch the time axis back to when it stopped.
    if (r.run < this.run) return;
    if (r.run > this.run) {
      this.clear();
      this.run = r.run;
    }
    this.watermark = Math.max(this.watermark ?? 0, r.watermark_ms);
    switch (r.stream) {
      case "pageviews":
        insertByTime(this.ticks, { t: r.window_start_ms, end: r.window_end_ms, pages: r.data.pages });
        break;
      case "window":
        this.window = r;
        break;
      case "topn":
        this.topn = r.data.pages;
        this.topnWindow = [r.window_start_ms, r.window_end_ms];
        break;
      case "sessions":
        this.lastSessions = { ...r.data, seq: r.seq };
        insertByTime(this.sessions, {
          t: r.window_start_ms,
          active: r.data.active,
          fresh: r.data.new_visitors,
          returning: r.data.returning_visitors,
        });
        break;
      case "totals":
        this.totals = r.data;
        break;
    }
    this.dirty = true;
  }

  private clear(): void {
    this.ticks = [];
    this.sessions = [];
    this.lastSessions = null;
    this.window = null;
    this.topn = [];
    this.topnWindow = null;
    this.totals = null;
    this.watermark = null;
  }
}

/**
 * Chart points of `ticks`, with a break (a null point) after a tick that the next one does not
 * follow: a tick with no views is never sent, and the gateway may have conflated some away, so
 * the chart must not draw a line across what it never saw.
 */
function withGaps(ticks: Tick[], value: (t: Tick) => number): [number, number | null][] {
  const out: [number, number | null][] = [];
  ticks.forEach((t, i) => {
    out.push([t.t, value(t)]);
    const next = ticks[i + 1];
    if (next && next.t > t.end) out.push([t.end, null]);
  });
  return out;
}

function insertByTime<T extends { t: number }>(list: T[], item: T): void {
  let i = list.length;
  while (i > 0 && list[i - 1].t > item.t) i -= 1;
  if (i > 0 && list[i - 1].t === item.t) list[i - 1] = item;
  else list.splice(i, 0, item);
  if (list.length > HISTORY) list.splice(0, list.length - HISTORY);
}

function kpi(id: string, label: string): { box: HTMLElement; value: HTMLElement } {
  const value = el("div", { class: "kpi-value", "data-testid": id }, "–");
  return { box: el("div", { class: "kpi" }, el("div", { class: "kpi-label" }, label), value), value };
}

export function dashboard(root: HTMLElement, token: string, claims: Claims | null, signOut: () => void): void {
  const state = new State();
  const status = el("span", { class: "status", "data-testid": "connection", "data-state": "connecting" }, "connecting…");
  const clock = el("span", { class: "clock", "data-testid": "event-clock" }, "event time –");
  const behind = el("span", { class: "behind", "data-testid": "behind" }, "");
  const tenantName = el("strong", { "data-testid": "tenant" }, claims?.tenant ?? "…");
  const out = el("button", { type: "button", class: "link" }, "sign out");
  out.onclick = signOut;

  const k = {
    windowViews: kpi("window-views", "views, sliding window"),
    active: kpi("active-sessions", "active sessions"),
    bounce: kpi("bounce-rate", "bounce rate"),
    newRet: kpi("new-returning", "new / returning visitors"),
    views: kpi("views-per-session", "views per session"),
    minutes: kpi("minutes-per-session", "minutes per session"),
    total: kpi("total-views", "views since the job started"),
  };
  const windowNote = el("div", { class: "note", "data-testid": "window-span" }, "");

  const pvBox = el("div", { class: "chart", "data-testid": "chart-pageviews" });
  const topBox = el("div", { class: "chart", "data-testid": "chart-topn" });
  const sesBox = el("div", { class: "chart", "data-testid": "chart-sessions" });
  const empty = el("p", { class: "waiting", "data-testid": "waiting" }, "Waiting for the first results — the tenant's job starts when you connect.");

  root.replaceChildren(
    el("header", {},
      el("h1", {}, "clickpulse"),
      el("span", { class: "tenant" }, "tenant ", tenantName),
      status,
      clock,
      behind,
      el("a", { href: "?view=ops", class: "link" }, "ops"),
      out,
    ),
    empty,
    el("section", { class: "kpis" }, ...Object.values(k).map((x) => x.box)),
    windowNote,
    el("section", { class: "grid" },
      el("figure", { class: "card wide" }, el("figcaption", {}, "Page views per second, by page (event time)"), pvBox),
      el("figure", { class: "card" }, el("figcaption", {}, "Top pages, sliding window"), topBox),
      el("figure", { class: "card" }, el("figcaption", {}, "Sessions: active, and opened by new vs returning visitors"), sesBox),
    ),
  );

  const charts = { pv: chart(pvBox), top: chart(topBox), ses: chart(sesBox) };
  setupCharts(charts);

  const setStatus = (s: ConnState): void => {
    status.dataset.state = s.kind;
    switch (s.kind) {
      case "connecting":
        status.textContent = s.attempt > 1 ? `reconnecting (attempt ${s.attempt})…` : "connecting…";
        break;
      case "live":
        status.textContent = `live · ${s.gateway}`;
        status.title = `client ${s.client} on gateway ${s.gateway}`;
        break;
      case "waiting":
        status.textContent = `offline: ${s.reason}; retrying in ${ago(s.retryAt - Date.now())}`;
        break;
      case "stopped":
        status.textContent = `disconnected: ${s.reason}`;
        break;
    }
  };

  const conn = new Connection({
    token,
    streams: STREAMS,
    maxRateHz: MAX_RATE_HZ,
    onState: setStatus,
    onMessage: (msg: ServerMsg) => {
      if (msg.type === "welcome") {
        tenantName.textContent = msg.tenant;
      } else if (msg.type === "result") {
        if (msg.snapshot && msg.result.stream === "pageviews") state.tickSnapshots += 1;
        state.apply(msg.result);
      } else if (msg.type === "error") {
        console.warn(`clickpulse gateway: ${msg.code}: ${msg.message}`);
      }
    },
  });
  conn.start();

  window.setInterval(() => {
    if (state.watermark !== null) {
      clock.textContent = `event time ${utc(state.watermark)}`;
      // A replay faster than real time runs ahead of the wall clock; a live feed lags it.
      const lag = Date.now() - state.watermark;
      behind.textContent = lag >= 0 ? `${ago(lag)} behind now` : `${ago(-lag)} ahead of now (replay)`;
    }
    if (!state.dirty) return;
    state.dirty = false;
    render(state, charts, k, windowNote, empty);
    root.dataset.received = String(state.received);
    root.dataset.tenants = [...state.tenantsSeen].sort().join(",");
  }, RENDER_INTERVAL_MS);
}

type Kpis = Record<string, { value: HTMLElement }>;

function setupCharts(c: { pv: Chart; top: Chart; ses: Chart }): void {
  const grid = { left: 48, right: 16, top: 36, bottom: 28, containLabel: false };
  c.pv.setOption({
    animation: false,
    grid: { ...grid, top: 56 },
    tooltip: { trigger: "axis" },
    legend: { type: "scroll", top: 0 },
    // A time axis, not categories: ticks the gateway conflated away (a fast backfill, a slow
    // link) show as a gap instead of squeezing minutes into one step.
    xAxis: {
      type: "time",
      axisLabel: { hideOverlap: true, formatter: (ms: number) => timeLabel(ms) },
    },
    yAxis: { type: "value", name: "views/s" },
    series: [],
  });
  c.top.setOption({
    animation: false,
    grid: { ...grid, left: 110, right: 56 },
    tooltip: { trigger: "axis" },
    xAxis: { type: "value" },
    yAxis: { type: "category", inverse: true, axisLabel: { width: 96, overflow: "truncate" } },
    series: [{ type: "bar", name: "views", data: [], label: { show: true, position: "right" } }],
  });
  c.ses.setOption({
    animation: false,
    grid,
    tooltip: { trigger: "axis" },
    legend: { top: 0 },
    xAxis: { type: "category", axisLabel: { hideOverlap: true } },
    yAxis: [
      { type: "value", name: "active" },
      { type: "value", name: "opened", splitLine: { show: false } },
    ],
    series: [
      { type: "line", name: "active", showSymbol: false, data: [] },
      { type: "bar", name: "new", stack: "opened", yAxisIndex: 1, data: [] },
      { type: "bar", name: "returning", stack: "opened", yAxisIndex: 1, data: [] },
    ],
  });
}

function render(
  s: State,
  c: { pv: Chart; top: Chart; ses: Chart },
  k: Kpis,
  windowNote: HTMLElement,
  empty: HTMLElement,
): void {
  empty.hidden = s.received > 0;
  // Page views per second: one stacked series per page, pages ordered by their views.
  const byPage = new Map<string, number>();
  for (const t of s.ticks) for (const p of t.pages) byPage.set(p.page, (byPage.get(p.page) ?? 0) + p.views);
  const pages = [...byPage.entries()].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0])).map((e) => e[0]);
  c.pv.setOption(
    {
      series: pages.map((page) => ({
        type: "line",
        name: page,
        stack: "views",
        areaStyle: {},
        showSymbol: false,
        lineStyle: { width: 0.5 },
        data: withGaps(s.ticks, (t) => t.pages.find((p) => p.page === page)?.views ?? 0),
      })),
    },
    { replaceMerge: ["series"] },
  );
  c.pv.getDom().dataset.points = String(s.ticks.length);
  c.pv.getDom().dataset.snapshots = String(s.tickSnapshots);

  c.top.setOption({
    yAxis: { data: s.topn.map((p) => p.page) },
    series: [{ data: s.topn.map((p) => p.views) }],
  });
  c.top.getDom().dataset.points = String(s.topn.length);

  c.ses.setOption({
    xAxis: { data: s.sessions.map((p) => timeLabel(p.t)) },
    series: [
      { data: s.sessions.map((p) => p.active) },
      { data: s.sessions.map((p) => p.fresh) },
      { data: s.sessions.map((p) => p.returning) },
    ],
  });
  c.ses.getDom().dataset.points = String(s.sessions.length);

  if (s.window && s.window.stream === "window") {
    const views = s.window.data.pages.reduce((sum, p) => sum + p.views, 0);
    const v = k.windowViews.value;
    v.textContent = int(views);
    v.dataset.raw = String(views);
    v.dataset.epoch = String(s.window.epoch);
    v.dataset.seq = String(s.window.seq);
    v.dataset.windowStart = String(s.window.window_start_ms);
    v.dataset.windowEnd = String(s.window.window_end_ms);
    windowNote.textContent = `window ${utc(s.window.window_start_ms)} – ${utc(s.window.window_end_ms).slice(11)} · job epoch ${s.window.epoch}`;
  } else {
    // A new run, its first window not in yet.
    k.windowViews.value.textContent = "–";
    delete k.windowViews.value.dataset.raw;
    windowNote.textContent = "";
  }
  const ses = s.lastSessions;
  k.active.value.textContent = ses ? int(ses.active) : "–";
  k.bounce.value.textContent = ses && ses.closed > 0 ? pct(ses.bounce_rate) : "–";
  k.newRet.value.textContent = ses ? `${int(ses.new_visitors)} / ${int(ses.returning_visitors)}` : "–";
  k.views.value.textContent = ses && ses.closed > 0 ? fixed(ses.avg_views) : "–";
  k.minutes.value.textContent = ses && ses.closed > 0 ? fixed(ses.avg_duration_ms / 60_000) : "–";
  k.total.value.textContent = s.totals ? int(s.totals.views) : "–";
  if (s.totals) k.total.value.dataset.raw = String(s.totals.views);
  else delete k.total.value.dataset.raw;
}
