// Shared by the viewer and the operations page: the token, authenticated fetches, DOM building by textContent.
//
// The token lives in this tab's sessionStorage only (gone when the tab closes) and is sent as
// "Authorization: Bearer" to the service's own APIs. Nothing here ever writes markup from data: every text
// (a patient's name included) goes in through textContent or an attribute set by setAttribute.

const TOKEN_KEY = "clinfer.token";

export class SignedOut extends Error {}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

// The token's claims, for display only (the server checks the signature; the page trusts nothing in it).
export function claims() {
  const value = token();
  if (!value) return null;
  try {
    const payload = value.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload.padEnd(payload.length + ((4 - (payload.length % 4)) % 4), "=")));
  } catch {
    return null;
  }
}

// el("td", {class: "x"}, "text", child): an element; strings become text nodes, never markup.
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  node.replaceChildren();
  return node;
}

export function show(node, visible) {
  node.hidden = !visible;
}

// A message in the page's alert region (role="alert": read out by screen readers).
export function say(text, kind = "error") {
  const region = document.getElementById("message");
  region.className = "message " + kind;
  region.textContent = text || "";
  show(region, Boolean(text));
}

let onSignedIn = () => {};
const blobUrls = new Set();

export function blobUrl(blob) {
  const url = URL.createObjectURL(blob);
  blobUrls.add(url);
  return url;
}

export function revokeBlobUrls() {
  for (const url of blobUrls) URL.revokeObjectURL(url);
  blobUrls.clear();
}

export function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  revokeBlobUrls();
  for (const section of document.querySelectorAll("main > section.page")) show(section, false);
  // what the pages showed (patients, findings, images) leaves the page too, not only the screen
  for (const node of document.querySelectorAll("[data-clear]")) {
    if (node instanceof HTMLImageElement) {
      node.removeAttribute("src");
      node.hidden = true;
    } else {
      node.replaceChildren();
    }
  }
  showSignIn(message);
}

function showSignIn(message) {
  show(document.getElementById("account"), false);
  show(document.getElementById("sign-in"), true);
  say(message || "", "info");
  document.getElementById("token-input").focus();
}

function showAccount() {
  const who = claims() || {};
  const role = who.clinfer_role || (who.scope ? "custom scopes" : "unknown role");
  const expires = who.exp ? " · expires " + new Date(who.exp * 1000).toLocaleString() : "";
  document.getElementById("account-name").textContent = (who.sub || "signed in") + " (" + role + ")" + expires;
  show(document.getElementById("account"), true);
  show(document.getElementById("sign-in"), false);
}

// fetch() with the token; a 401 signs out (back to sign-in), a 403 and other errors become an ApiError whose
// message is the API's own ({"error": {"message"}}, or an OperationOutcome's diagnostics).
export async function api(path, options = {}) {
  const value = token();
  if (!value) {
    signOut("Sign in to continue.");
    throw new SignedOut();
  }
  const headers = Object.assign({}, options.headers || {}, { Authorization: "Bearer " + value });
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (response.status === 401) {
    signOut("The service refused the token (expired or not valid). Sign in again.");
    throw new SignedOut();
  }
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = (body.error && body.error.message) || (body.issue && body.issue[0] && body.issue[0].diagnostics) || detail;
    } catch {
      // not JSON: the status text will do
    }
    if (response.status === 403) {
      throw new ApiError(403, "Your role may not see this: " + detail);
    }
    throw new ApiError(response.status, detail);
  }
  return response;
}

export async function apiJson(path, options = {}) {
  return (await api(path, options)).json();
}

// A failure as a message in the alert region; signed out needs no message of its own.
export function report(error) {
  if (error instanceof SignedOut) return;
  say(error instanceof ApiError ? error.message : "Something went wrong: " + error.message);
}

// Wire the sign-in form and the sign-out button, then run `start` now (a token is held) or after sign-in.
export function boot(start) {
  onSignedIn = start;
  document.getElementById("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token-input");
    const value = input.value.trim().replace(/^Bearer\s+/i, "");
    if (!/^[\w-]+\.[\w-]+\.[\w-]+$/.test(value)) {
      say("That does not look like a bearer token (three dot-separated parts).");
      input.focus();
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    input.value = "";
    say("");
    showAccount();
    onSignedIn();
  });
  document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
  if (token()) {
    showAccount();
    start();
  } else {
    signOut("");
  }
}

export function formatDateTime(text) {
  if (!text) return "—";
  const when = new Date(text);
  return Number.isNaN(when.getTime()) ? text : when.toLocaleString();
}
