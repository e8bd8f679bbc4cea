// The wire contracts the dashboard speaks, as `protocol/src/ws.rs`, `results.rs` and the
// cluster view (`cluster/src/view.rs`) define them. The Rust crate is the source of truth.

export type Stream = "pageviews" | "window" | "topn" | "sessions" | "totals";
export const STREAMS: Stream[] = ["pageviews", "window", "topn", "sessions", "totals"];

export interface PageCount {
  page: string;
  views: number;
}

export interface SessionStats {
  active: number;
  opened: number;
  closed: number;
  bounces: number;
  bounce_rate: number;
  new_visitors: number;
  returning_visitors: number;
  avg_views: number;
  avg_duration_ms: number;
}

export interface Totals {
  views: number;
  pages: PageCount[];
  sessions: number;
  returning_sessions: number;
  late: number;
  dead_lettered: number;
}

interface ResultHead {
  tenant: string;
  epoch: number;
  /** The run (`protocol::results`): results are ordered by (run, seq). */
  run: number;
  seq: number;
  window_start_ms: number;
  window_end_ms: number;
  watermark_ms: number;
}

export type Result = ResultHead &
  (
    | { stream: "pageviews"; data: { pages: PageCount[] } }
    | { stream: "window"; data: { pages: PageCount[] } }
    | { stream: "topn"; data: { n: number; pages: PageCount[] } }
    | { stream: "sessions"; data: SessionStats }
    | { stream: "totals"; data: Totals }
  );

export type ServerMsg =
  | { type: "welcome"; tenant: string; client: string; gateway: string; streams: Stream[] }
  | { type: "result"; snapshot: boolean; result: Result }
  | { type: "error"; code: string; message: string };

/** A place in a tenant's output: a resuming client gets nothing at or before it. */
export interface Position {
  run: number;
  seq: number;
}

export type ClientMsg =
  | { type: "subscribe"; streams: Stream[]; max_rate_hz?: number; after?: Position }
  | { type: "unsubscribe"; streams: Stream[] };

/**
 * A subscription as query parameters of the upgrade request (`protocol::ws::Subscription::
 * from_query`): `streams=pageviews,topn&max_rate_hz=4&after=2:5120`.
 */
export function subscriptionQuery(streams: Stream[], maxRateHz?: number, after?: Position): string {
  const params = new URLSearchParams({ streams: streams.join(",") });
  if (maxRateHz !== undefined) params.set("max_rate_hz", String(maxRateHz));
  if (after) params.set("after", `${after.run}:${after.seq}`);
  return params.toString();
}

/** Close codes (`protocol::ws::CloseCode`) after which reconnecting cannot help. */
export const FINAL_CLOSE: Record<number, string> = {
  1000: "closed",
  1008: "token no longer valid",
  1009: "frame too large",
};

/** The WebSocket subprotocol offered next to the token. */
export const SUBPROTOCOL = "clickpulse.v1";

// --- cluster view (GET /admin/cluster) --------------------------------------------------------

export interface GatewayInfo {
  id: string;
  zmq_endpoint: string;
  http_addr: string;
  started_at_ms: number;
}

export interface EngineInfo {
  id: string;
  host: string;
  started_at_ms: number;
}

export interface ClientRegistration {
  gateway: string;
  client: string;
  tenant: string;
  rights: string[];
  streams: Stream[];
  connected_at_ms: number;
}

export interface OwnerRecord {
  engine: string;
  epoch: number;
  since_ms: number;
}

export interface TenantView {
  tenant: string;
  clients: ClientRegistration[];
  owner: OwnerRecord | null;
  epoch: number | null;
}

export interface ClusterView {
  gateways: GatewayInfo[];
  engines: EngineInfo[];
  tenants: TenantView[];
}

/** The job's state as ZooKeeper shows it (`TenantView::job_state`). */
export function jobState(t: TenantView): "running" | "lingering" | "waiting" | "idle" {
  const watched = t.clients.length > 0;
  if (t.owner) return watched ? "running" : "lingering";
  return watched ? "waiting" : "idle";
}
