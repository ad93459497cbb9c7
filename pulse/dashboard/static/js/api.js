// The page's credentials and its calls to the REST API.
//
// A JWT comes in once (pasted, or from a #token= URL fragment, which browsers
// never send to a server) and is kept in sessionStorage: this tab only, gone
// when the tab closes. It is only ever sent in an Authorization header. A link's
// token never replaces this tab's session of another tenant or subject unasked
// (Session.offered, app.js).
// Streams get one-time tickets instead (ticket()), so no URL carries it.

const TOKEN_KEY = "pulse.token";
const TENANT_KEY = "pulse.tenant";

export class AuthError extends Error {}

export class ApiError extends Error {
  constructor(status, code, detail, retryAfterS = null) {
    super(detail || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
    this.retryAfterS = retryAfterS; // the server's Retry-After, in seconds, when it sent one
  }

  // Asking again later may succeed: the server is busy, restarting or unreachable.
  get transient() {
    return this.status === 0 || this.status === 408 || this.status === 429 || this.status >= 500;
  }
}

// The tenant named (or not named) is the problem: an operator must choose one.
export function isTenantProblem(error) {
  return error instanceof ApiError && (error.code === "tenant_required" || error.code === "invalid_tenant_id");
}

// The error an HTTP answer that is not ok stands for, from the API's one error body.
async function errorOf(response) {
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) return new AuthError(body.detail || "The token was refused.");
  const retryAfter = Number.parseFloat(response.headers.get("Retry-After"));
  return new ApiError(response.status, body.error, body.detail, retryAfter >= 0 ? retryAfter : null);
}

// fetch(), with "the server cannot be reached" as an ApiError like any other.
async function send(url, options) {
  try {
    return await fetch(url, { cache: "no-store", credentials: "omit", ...options });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "unreachable", "The server cannot be reached.");
  }
}

export function claimsOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
  } catch {
    return null;
  }
}

export class Session {
  constructor(token, tenant) {
    this.token = token;
    this.tenant = tenant || null;
    this.claims = claimsOf(token) || {};
  }

  // The sign-in a #token=...&tenant=... link offers, or null: held here only, not
  // stored, since it may be someone else's (app.js asks before it replaces this tab's
  // session). The fragment is removed from the address bar and history in every case.
  static offered() {
    const fragment = new URLSearchParams(window.location.hash.slice(1));
    if (!fragment.has("token")) return null;
    history.replaceState(null, "", window.location.pathname + window.location.search);
    const token = fragment.get("token").trim();
    return token ? new Session(token, (fragment.get("tenant") || "").trim()) : null;
  }

  // This tab's session, from its storage; null when it has none.
  static restore() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? new Session(token, sessionStorage.getItem(TENANT_KEY)) : null;
  }

  static store(token, tenant) {
    sessionStorage.setItem(TOKEN_KEY, token.trim());
    if (tenant) sessionStorage.setItem(TENANT_KEY, tenant.trim());
    else sessionStorage.removeItem(TENANT_KEY);
  }

  static clear() {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(TENANT_KEY);
  }

  get tenantName() {
    const org = this.claims.organization;
    if (typeof org === "string" && org) return org;
    if (org && typeof org === "object" && !Array.isArray(org)) return Object.keys(org)[0];
    if (Array.isArray(org)) return org.find((o) => typeof o === "string" && o);
    return this.tenant || this.claims.tenant_id || "";
  }

  // Who the token says signs in: its `sub`, or "" when it names none.
  get subject() {
    return typeof this.claims.sub === "string" ? this.claims.sub : "";
  }

  // The same tenant and the same subject: another token of the same person, not a switch.
  sameIdentity(other) {
    return this.tenantName === other.tenantName && this.subject === other.subject;
  }

  get roles() {
    const realm = (this.claims.realm_access && this.claims.realm_access.roles) || [];
    return [...new Set([...realm, ...(this.claims.roles || [])])];
  }

  get canManage() {
    return this.roles.includes("tenant-admin") || this.roles.includes("operator-admin");
  }

  get expiresAt() {
    return this.claims.exp ? new Date(this.claims.exp * 1000) : null;
  }

  // Query parameters every tenant-scoped call carries (operators name a tenant).
  params(extra = {}) {
    const params = new URLSearchParams(extra);
    if (this.tenant) params.set("tenant_id", this.tenant);
    return params;
  }

  async request(method, path, extra = {}) {
    const query = this.params(extra).toString();
    const response = await send(query ? `${path}?${query}` : path, {
      method,
      headers: { Authorization: `Bearer ${this.token}`, Accept: "application/json" },
    });
    if (!response.ok) throw await errorOf(response);
    return response.status === 204 ? null : response.json();
  }

  // Every item of a paged list (devices, alert rules: docs/fleet.md), under `key`: the
  // pages in turn, each from the last one's next_cursor, until it is null (a server
  // from before pages sends none, with the whole list).
  async requestAll(path, key, extra = {}) {
    const items = [];
    for (let params = extra; ; ) {
      const body = await this.request("GET", path, params);
      for (const item of body[key] || []) items.push(item);
      if (!body.next_cursor) return items;
      params = { ...extra, cursor: body.next_cursor };
    }
  }

  async ticket() {
    // No tenant_id here: the ticket carries the token's identity; the stream URL names the tenant.
    const response = await send("/api/v1/stream-ticket", {
      method: "POST",
      headers: { Authorization: `Bearer ${this.token}` },
    });
    if (!response.ok) throw await errorOf(response);
    return (await response.json()).ticket;
  }

  // Why the server refused a stream: EventSource only says that it did. The same
  // URL is asked again with the token in a header instead of a ticket; the error
  // it answers with (AuthError or ApiError), or null when it accepts this time
  // (the stream is then dropped at once).
  async refusal(path, params) {
    const controller = new AbortController();
    try {
      const response = await send(`${path}?${params}`, {
        headers: { Authorization: `Bearer ${this.token}`, Accept: "text/event-stream" },
        signal: controller.signal,
      });
      return response.ok ? null : await errorOf(response);
    } catch (error) {
      return error instanceof ApiError ? error : null;
    } finally {
      controller.abort();
    }
  }
}
