// Entry: sign-in, then the tenant dashboard, or the ops view (`?view=ops`, admin token).

import "./style.css";
import { dashboard } from "./dashboard";
import { el } from "./format";
import { ops } from "./ops";
import { forgetToken, readClaims, storeToken, takeToken } from "./token";

const root = document.getElementById("app") as HTMLElement;

function signOut(): void {
  forgetToken();
  window.location.reload();
}

function signIn(problem?: string): void {
  const input = el("textarea", { rows: "4", placeholder: "eyJhbGciOiJIUzI1NiJ9…", "aria-label": "tenant token" });
  const form = el("form", { class: "signin" },
    el("h1", {}, "clickpulse"),
    el("p", {}, "Paste a tenant token (", el("code", {}, "clickpulse token --tenant acme"), "), or open a link the demo printed."),
    ...(problem ? [el("p", { class: "error", "data-testid": "signin-error" }, problem)] : []),
    input,
    el("button", { type: "submit" }, "Sign in"),
  );
  form.onsubmit = (e) => {
    e.preventDefault();
    storeToken(input.value);
    window.location.reload();
  };
  root.replaceChildren(form);
}

const token = takeToken();
const claims = token ? readClaims(token) : null;
const view = new URLSearchParams(window.location.search).get("view");
if (!token) {
  signIn();
} else if (!claims) {
  forgetToken();
  signIn("That is not a clickpulse token.");
} else if (claims.exp * 1000 < Date.now()) {
  forgetToken();
  signIn(`That token expired ${new Date(claims.exp * 1000).toISOString()}; ask for a new one.`);
} else if (view === "ops") {
  ops(root, token, signOut);
} else {
  dashboard(root, token, claims, signOut);
}
