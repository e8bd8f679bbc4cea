// The tenant token: taken from the link (`?token=`), kept for this tab only (sessionStorage),
// and removed from the address bar so it does not end up in history or screenshots.

const KEY = "clickpulse.token";

export interface Claims {
  tenant: string;
  sub: string;
  rights: string[];
  exp: number;
}

export function takeToken(): string | null {
  const url = new URL(window.location.href);
  const fromLink = url.searchParams.get("token");
  if (fromLink) {
    sessionStorage.setItem(KEY, fromLink);
    url.searchParams.delete("token");
    window.history.replaceState(null, "", url.pathname + url.search + url.hash);
    return fromLink;
  }
  return sessionStorage.getItem(KEY);
}

export function storeToken(token: string): void {
  sessionStorage.setItem(KEY, token.trim());
}

export function forgetToken(): void {
  sessionStorage.removeItem(KEY);
}

/** The token's claims, read for display only: the gateway is what verifies it. */
export function readClaims(token: string): Claims | null {
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/"));
    const c = JSON.parse(json) as Partial<Claims>;
    if (typeof c.tenant !== "string" || typeof c.exp !== "number") return null;
    return { tenant: c.tenant, sub: c.sub ?? "", rights: c.rights ?? [], exp: c.exp };
  } catch {
    return null;
  }
}
