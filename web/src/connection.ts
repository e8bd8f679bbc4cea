// One WebSocket to the gateway that reconnects by itself (exponential backoff with full
// jitter) and subscribes in every upgrade request, resuming after the last result it got so
// nothing reaches the page twice.

import { FINAL_CLOSE, SUBPROTOCOL, subscriptionQuery, type Position, type ServerMsg, type Stream } from "./protocol";

export type ConnState =
  | { kind: "connecting"; attempt: number }
  | { kind: "live"; gateway: string; client: string }
  | { kind: "waiting"; retryAt: number; reason: string }
  | { kind: "stopped"; reason: string };

export interface ConnectionOptions {
  token: string;
  streams: Stream[];
  /** Most messages per second per stream the gateway should send. */
  maxRateHz: number;
  onMessage: (msg: ServerMsg) => void;
  onState: (state: ConnState) => void;
}

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30_000;

export class Connection {
  private socket: WebSocket | null = null;
  private attempt = 0;
  private timer: number | undefined;
  private closedByUs = false;
  private last: Position | undefined;

  constructor(private readonly opts: ConnectionOptions) {}

  start(): void {
    this.closedByUs = false;
    this.open();
  }

  stop(): void {
    this.closedByUs = true;
    window.clearTimeout(this.timer);
    this.socket?.close(1000);
    this.socket = null;
  }

  private open(): void {
    this.attempt += 1;
    this.opts.onState({ kind: "connecting", attempt: this.attempt });
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    // The token travels as a subprotocol, not in the URL: it stays out of access logs. The
    // subscription is in the URL: the gateway registers the tab with its streams in one
    // ZooKeeper write and sends the snapshots right after the welcome.
    const query = subscriptionQuery(this.opts.streams, this.opts.maxRateHz, this.last);
    const socket = new WebSocket(`${scheme}://${window.location.host}/ws?${query}`, [
      SUBPROTOCOL,
      this.opts.token,
    ]);
    this.socket = socket;
    socket.onmessage = (ev: MessageEvent) => {
      if (typeof ev.data !== "string") return;
      let msg: ServerMsg;
      try {
        msg = JSON.parse(ev.data) as ServerMsg;
      } catch {
        console.warn("clickpulse: a message that is not JSON", ev.data);
        return;
      }
      if (msg.type === "welcome") {
        this.attempt = 0;
        this.opts.onState({ kind: "live", gateway: msg.gateway, client: msg.client });
      }
      if (msg.type === "result") {
        const { run, seq } = msg.result;
        if (!this.last || run > this.last.run || (run === this.last.run && seq > this.last.seq)) {
          this.last = { run, seq };
        }
      }
      this.opts.onMessage(msg);
    };
    socket.onclose = (ev: CloseEvent) => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.closedByUs) return;
      const final = FINAL_CLOSE[ev.code];
      if (final) {
        this.opts.onState({ kind: "stopped", reason: `${final} (${ev.code})` });
        return;
      }
      // 1006 before any welcome is how a browser reports an HTTP 401 on the upgrade.
      const reason = ev.reason || (ev.code === 1006 ? "connection lost or refused" : `closed (${ev.code})`);
      const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(this.attempt, 10));
      const delay = BACKOFF_MIN_MS / 2 + Math.random() * ceiling;
      this.opts.onState({ kind: "waiting", retryAt: Date.now() + delay, reason });
      this.timer = window.setTimeout(() => this.open(), delay);
    };
  }
}
