export const int = (n: number): string => Math.round(n).toLocaleString("en-US");

export const pct = (x: number): string => `${(x * 100).toFixed(1)} %`;

export const fixed = (x: number, digits = 1): string => x.toFixed(digits);

/** Event time as UTC, the way the dataset's clock reads. */
export const utc = (ms: number): string =>
  new Date(ms).toISOString().replace("T", " ").slice(0, 19) + " UTC";

/** A duration in words: "850 ms", "12.4 s", "3 min 5 s", "2 h 10 min", "412 d". */
export function ago(ms: number): string {
  const a = Math.abs(ms);
  const sign = ms < 0 ? "-" : "";
  if (a < 1000) return `${sign}${Math.round(a)} ms`;
  if (a < 60_000) return `${sign}${(a / 1000).toFixed(1)} s`;
  if (a < 3_600_000) return `${sign}${Math.floor(a / 60_000)} min ${Math.floor((a % 60_000) / 1000)} s`;
  if (a < 86_400_000) return `${sign}${Math.floor(a / 3_600_000)} h ${Math.floor((a % 3_600_000) / 60_000)} min`;
  return `${sign}${Math.floor(a / 86_400_000)} d`;
}

export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  e.append(...children);
  return e;
}
