// The ops view: the cluster as ZooKeeper shows it, from the gateway's /admin/cluster.

import { ago, el, utc } from "./format";
import { jobState, type ClusterView } from "./protocol";

const POLL_MS = 1000;

export function ops(root: HTMLElement, token: string, signOut: () => void): void {
  const status = el("span", { class: "status", "data-testid": "connection", "data-state": "connecting" }, "loading…");
  const out = el("button", { type: "button", class: "link" }, "sign out");
  out.onclick = signOut;
  const body = el("div", { class: "ops" });
  root.replaceChildren(
    el("header", {},
      el("h1", {}, "clickpulse"),
      el("span", { class: "tenant" }, "ops: the ZooKeeper picture"),
      status,
      el("a", { href: "./", class: "link" }, "dashboard"),
      out,
    ),
    body,
  );

  let failures = 0;
  const poll = async (): Promise<void> => {
    try {
      const res = await fetch("/admin/cluster", { headers: { authorization: `Bearer ${token}` } });
      if (res.status === 401 || res.status === 403) {
        const why = (await res.json().catch(() => ({}))) as { reason?: string };
        status.dataset.state = "stopped";
        status.textContent = `${res.status === 403 ? "forbidden" : "unauthorized"}: ${why.reason ?? "an admin token is needed"}`;
        return; // no point asking again with the same token
      }
      if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
      const view = (await res.json()) as ClusterView;
      failures = 0;
      status.dataset.state = "live";
      status.textContent = `live · updated ${utc(Date.now()).slice(11)}`;
      render(body, view);
    } catch (e) {
      failures += 1;
      status.dataset.state = "waiting";
      status.textContent = `cannot read the cluster (${String(e)}); retrying`;
    }
    window.setTimeout(poll, Math.min(POLL_MS * 2 ** failures, 15_000));
  };
  void poll();
}

function table(testid: string, head: string[], rows: (string | Node)[][], empty: string): HTMLElement {
  if (rows.length === 0) return el("p", { class: "note", "data-testid": testid }, empty);
  return el("table", { "data-testid": testid },
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, c))))),
  );
}

function since(ms: number): string {
  return `${ago(Date.now() - ms)} ago`;
}

function render(body: HTMLElement, v: ClusterView): void {
  const jobs = v.tenants.map((t) => {
    const state = jobState(t);
    const badge = el("span", { class: `badge ${state}`, "data-testid": `job-${t.tenant}`, "data-state": state }, state);
    return [
      t.tenant,
      badge,
      t.owner?.engine ?? "–",
      t.owner ? String(t.owner.epoch) : t.epoch !== null ? `(last ${t.epoch})` : "–",
      String(t.clients.length),
      t.owner ? since(t.owner.since_ms) : "–",
    ];
  });
  const clients = v.tenants.flatMap((t) =>
    t.clients.map((c) => [t.tenant, c.client, c.gateway, c.rights.join(", "), c.streams.join(", "), since(c.connected_at_ms)]),
  );
  body.replaceChildren(
    el("section", { class: "counts" },
      el("span", { "data-testid": "count-gateways" }, `${v.gateways.length} gateways`),
      el("span", { "data-testid": "count-engines" }, `${v.engines.length} engines`),
      el("span", {}, `${v.tenants.filter((t) => t.owner).length} jobs running or lingering`),
      el("span", {}, `${clients.length} clients`),
    ),
    el("h2", {}, "Jobs"),
    table("jobs", ["tenant", "state", "owner engine", "epoch", "clients", "since"], jobs, "No tenant has ever been watched."),
    el("h2", {}, "Engines"),
    table("engines", ["engine", "host", "up"], v.engines.map((e) => [e.id, e.host, since(e.started_at_ms)]), "No engine is registered: no job can run."),
    el("h2", {}, "Gateways"),
    table("gateways", ["gateway", "HTTP", "ZeroMQ", "up"], v.gateways.map((g) => [g.id, g.http_addr, g.zmq_endpoint, since(g.started_at_ms)]), "No gateway is registered."),
    el("h2", {}, "Clients"),
    table("clients", ["tenant", "client", "gateway", "rights", "streams", "connected"], clients, "Nobody is watching."),
  );
}
