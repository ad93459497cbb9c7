// The page's two live connections, each reopened with a fresh one-time ticket
// after any disconnect, with exponential backoff and full jitter:
// - TelemetryStream: Server-Sent Events, resumed from the last event id, so
//   that every event is rendered exactly once across disconnects and restarts;
// - FleetSocket: the v2 WebSocket, subscribed to the fleet and alerts channels.
// A refusal that a retry cannot change (a bad request, a forbidden tenant or
// origin) stops the connection and goes to onFatal, with the reason.

import { ApiError, AuthError } from "./api.js";

const SSE_PATH = "/api/v1/customer/telemetry/stream/sse";
const WS_PATH = "/api/v1/customer/telemetry/stream";
const V2_PATH = "/api/v2/ws";

function wsUrl(path, params) {
  const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${window.location.host}${path}?${params}`;
}

// The tenant's newest event id, from the telemetry WebSocket's first message;
// null when it cannot be had. It gives the page an exact starting position
// (and a little history for the charts) before its SSE stream opens.
export async function newestEventId(session, timeoutMs = 5000) {
  let ticket;
  try {
    ticket = await session.ticket();
  } catch {
    return null;
  }
  return new Promise((resolve) => {
    const socket = new WebSocket(wsUrl(WS_PATH, session.params({ ticket })));
    const done = (value) => {
      clearTimeout(timer);
      socket.onmessage = socket.onclose = socket.onerror = null;
      socket.close(1000);
      resolve(value);
    };
    const timer = setTimeout(() => done(null), timeoutMs);
    socket.onmessage = (message) => {
      const data = JSON.parse(message.data);
      done(data.type === "connected" ? data.last_event_id : null);
    };
    socket.onclose = socket.onerror = () => done(null);
  });
}

const LIMIT_RETRY_S = 5; // the SSE 429's Retry-After; a WebSocket close 4029 has none

// A wait of at least `ms`, and up to half as long again: the tabs refused together do
// not all come back together.
const jittered = (ms) => ms + Math.random() * ms * 0.5;

export class Backoff {
  constructor(baseMs = 500, capMs = 15000) {
    this.baseMs = baseMs;
    this.capMs = capMs;
    this.attempt = 0;
  }
  next() {
    const ceiling = Math.min(this.capMs, this.baseMs * 2 ** Math.min(this.attempt, 30));
    this.attempt += 1;
    return Math.random() * ceiling;
  }
  reset() {
    this.attempt = 0;
  }
}

// Shared by both connections: state, notifications and the reconnect schedule.
class Reconnecting {
  constructor(session, { onState, onAuthError, onFatal }) {
    this.session = session;
    this.onState = onState;
    this.onAuthError = onAuthError;
    this.onFatal = onFatal;
    this.backoff = new Backoff();
    this.state = "connecting";
    this.detail = "";
    this.connections = 0;
    this.stopped = false;
    this.timer = null;
    this.limited = false; // refused for the tenant's (or the server's) connection limit
  }

  start() {
    this.stopped = false;
    this.open();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.close();
  }

  setState(state, detail = "") {
    this.state = state;
    this.detail = detail;
    this.onState();
  }

  async open() {
    if (this.stopped) return;
    let ticket;
    try {
      ticket = await this.session.ticket();
    } catch (error) {
      if (!this.stopped) this.refused(error, "ticket");
      return;
    }
    if (!this.stopped) this.connect(ticket);
  }

  // The server said no: sign out, give up with the reason, or try again later (no
  // sooner than its Retry-After). `what` names the request refused when it is not the
  // connection itself (the page already says which connection this is).
  refused(error, what = "") {
    const prefix = what ? `${what}: ` : "";
    if (error instanceof AuthError) {
      this.stopped = true;
      this.close();
      this.setState("offline", "signed out");
      this.onAuthError(error);
    } else if (error instanceof ApiError && !error.transient) {
      this.stopped = true;
      this.close();
      this.setState("offline", `${prefix}${error.code || error.status}`);
      this.onFatal(error);
    } else if (error instanceof ApiError && error.code === "connection_limit") {
      this.overLimit(error.retryAfterS);
    } else {
      const after = error instanceof ApiError ? error.retryAfterS : null;
      this.retry(`${prefix}${error.message}`, after === null ? null : jittered(after * 1000));
    }
  }

  // Too many live connections for the tenant (every tab and client counts): retried
  // after the server's Retry-After (5 s unless it says), and the page says why.
  overLimit(retryAfterS = null) {
    this.limited = true;
    const wait = Math.max(jittered((retryAfterS ?? LIMIT_RETRY_S) * 1000), this.backoff.next());
    this.retry("connection limit reached", wait);
  }

  connected() {
    this.connections += 1;
    this.backoff.reset();
    this.limited = false;
    this.setState("live");
  }

  retry(reason, delayMs = null) {
    this.close();
    if (this.stopped) return;
    const delay = delayMs ?? this.backoff.next();
    this.setState("reconnecting", reason);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), delay);
  }
}

export class TelemetryStream extends Reconnecting {
  constructor(session, { onEvents, onTrimmed, onState, onAuthError, onFatal }) {
    super(session, { onState, onAuthError, onFatal });
    this.onEvents = onEvents;
    this.onTrimmed = onTrimmed;
    this.lastEventId = null;
    this.duplicates = 0;
    this.source = null;
  }

  params(extra = {}) {
    const params = this.session.params(extra);
    if (this.lastEventId !== null) params.set("last_event_id", String(this.lastEventId));
    return params;
  }

  connect(ticket) {
    const source = new EventSource(`${SSE_PATH}?${this.params({ ticket })}`);
    this.source = source;
    source.onopen = () => this.connected();
    source.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (this.lastEventId !== null && event.id <= this.lastEventId) {
        this.duplicates += 1;
        return;
      }
      this.lastEventId = event.id;
      this.onEvents(event);
    };
    source.addEventListener("heartbeat", (message) => {
      // Events filtered out passed by: resume after them.
      if (message.lastEventId) this.lastEventId = Number(message.lastEventId);
    });
    source.addEventListener("reset", (message) => {
      const data = JSON.parse(message.data);
      if (data.reason === "unknown_position") this.lastEventId = data.last_event_id;
      else if (data.reason === "history_trimmed") {
        // The events after our position up to earliest_id - 1 are gone (retention):
        // the stream goes on from earliest_id. Said, not skipped silently.
        const after = this.lastEventId ?? 0;
        if (data.earliest_id > after + 1 && this.onTrimmed) this.onTrimmed(after + 1, data.earliest_id - 1);
        this.lastEventId = Math.max(after, data.earliest_id - 1);
      }
    });
    source.addEventListener("lagging", () => this.retry("fell behind; resuming", 0));
    source.onerror = (event) => {
      // An `error` event of the server's own (its data says why: the stream ends).
      let reason = null;
      try {
        reason = event.data ? JSON.parse(event.data).reason : null;
      } catch {
        // not the server's: a dropped connection
      }
      if (reason === "connection_limit") this.overLimit();
      // CLOSED: the server answered with an HTTP error, which EventSource does not
      // show; ask it why. Otherwise the connection dropped, and the browser would
      // reconnect by itself but with the spent ticket: take over.
      else if (source.readyState === EventSource.CLOSED) this.explainRefusal();
      else this.retry(this.connections ? "connection lost" : "cannot connect");
    };
  }

  async explainRefusal() {
    this.close();
    this.setState("reconnecting", "refused");
    const error = await this.session.refusal(SSE_PATH, this.params());
    if (this.stopped) return;
    if (error) this.refused(error);
    else this.retry("refused");
  }

  close() {
    if (this.source) {
      this.source.onerror = null;
      this.source.close();
      this.source = null;
    }
  }
}

// What a WebSocket close reason means to the person looking at the page.
const REFUSALS = {
  origin_not_allowed:
    "The server refuses WebSockets from this page's address (it is not in PULSE_ALLOWED_ORIGINS).",
  tenant_required: "Operators must choose a tenant.",
  forbidden: "This token does not give access to the fleet and alerts of this tenant.",
};
const CLOSES = { 1012: "server restarting", 4029: "connection limit reached" };

export class FleetSocket extends Reconnecting {
  constructor(session, { onSummary, onAlerts, onState, onAuthError, onFatal }) {
    super(session, { onState, onAuthError, onFatal });
    this.onSummary = onSummary;
    this.onAlerts = onAlerts;
    this.socket = null;
  }

  connect(ticket) {
    const socket = new WebSocket(wsUrl(V2_PATH, this.session.params({ ticket })));
    this.socket = socket;
    socket.onopen = () => {
      socket.send(JSON.stringify({ action: "subscribe", type: "fleet" }));
      socket.send(JSON.stringify({ action: "subscribe", type: "alerts" }));
    };
    socket.onmessage = (message) => {
      const data = JSON.parse(message.data);
      if (data.type === "subscribed" && this.state !== "live") this.connected();
      else if (data.type === "fleet_summary") this.onSummary(data.data);
      else if (data.type === "alerts") this.onAlerts(data.alerts);
    };
    socket.onclose = (event) => {
      if (event.code === 4001 && /expired/.test(event.reason)) {
        // The ticket carried the token's expiry: the token itself has expired.
        this.stopped = true;
        this.setState("offline", "token expired");
        this.onAuthError(new AuthError("Your token has expired."));
        return;
      }
      if (event.code === 4000 || event.code === 4003) {
        // A bad request, or forbidden (role, tenant or origin): retrying cannot help.
        const status = event.code === 4000 ? 400 : 403;
        this.refused(new ApiError(status, event.reason, REFUSALS[event.reason]));
        return;
      }
      if (event.code === 4029) {
        this.overLimit();
        return;
      }
      const why = CLOSES[event.code] || `closed (${event.code})`;
      this.retry(this.connections || event.code in CLOSES ? why : "cannot connect");
    };
  }

  close() {
    if (this.socket) {
      this.socket.onclose = null;
      this.socket.close();
      this.socket = null;
    }
  }
}
