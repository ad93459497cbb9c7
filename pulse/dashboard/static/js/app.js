// The dashboard: fleet summary, active alerts, live device values and charts.
//
// Data in: the REST API for the first paint and the charts' history, the SSE
// telemetry stream for readings (exactly once, resumed by id), the v2 WebSocket
// for the fleet summary and the active alerts. Data out: acknowledge and close
// alerts. Rendering happens in one place (flush), a few times a second at most.
//
// The seam between history and live: the stream opens first, a few events before
// the tenant's newest (for the table of latest events), and the histories load
// after it, a few at a time. Each device's history comes with the tenant's newest
// event id its snapshot holds (its seam), never older than the stream's start. Live
// events of a device whose history is still loading are charted and kept aside; its
// history replaces its chart, and those after its seam are charted again. A device's
// events up to its seam that arrive after its history go to the table only. Nothing
// between is missed, nothing counted twice.

import { ApiError, AuthError, Session, isTenantProblem } from "./api.js";
import { Sparkline, withGaps } from "./charts.js";
import { Backoff, FleetSocket, TelemetryStream, newestEventId } from "./streams.js";

const DEFAULT_RANGE_S = 3600; // the range picker's (index.html) first choice
// History requests in flight at once: half of a tenant's history slots
// (PULSE_MAX_HISTORY_READS_PER_TENANT, 6), so that another tab or client still has some.
const HISTORY_CONCURRENCY = 3;
// A history the server is too busy for (429, 503) is asked again after its Retry-After
// or a backoff of up to 8 s, whichever is longer, for as long as the page shows that
// range: never given up.
const HISTORY_RETRY_CAP_MS = 8000;
const LOADING_EVENTS = 1000; // a device's live events kept aside while its history loads
const NEWEST_ATTEMPTS = 3; // asks for the tenant's newest event id before the stream opens
const BACKFILL_EVENTS = 5000; // replayed at start when the server has no history API
const RECENT_ROWS = 15;
// Whatever a device sends (up to 200 metrics a reading, new names in each), the page
// keeps the first METRICS_PER_DEVICE names it sees of each device (its history's,
// preferred names first, then its readings'): their latest values and chart series.
// The card says when the device sent others. The chart picker lists the first
// METRICS_LISTED names of the fleet. A row of the latest events shows EVENT_METRICS.
// A device that sent 199 new names a second took the page to millions of DOM nodes and
// gigabytes, across reloads.
const METRICS_PER_DEVICE = 20;
const METRICS_LISTED = 100;
const EVENT_METRICS = 8;
const ALERTS_PUSHED = 100; // the v2 WebSocket's alerts push holds the newest 100 (docs/protocol.md)
const FLUSH_MS = 250;
const CHART_EVERY_MS = 1000;
// The device list is fetched again when the fleet summary disagrees with the cards (a
// device added, deleted, or gone STALE or OFFLINE: a reading makes its card ONLINE
// here), at most once per 10 ms per device shown, within 5 s and 60 s (2,000 devices:
// every 20 s at most), and every 5 minutes for names and sites, which no stream announces.
const DEVICE_REFRESH_MIN_MS = 5000;
const DEVICE_REFRESH_MAX_MS = 60000;
const DEVICE_REFRESH_PER_DEVICE_MS = 10;
const DEVICE_REFRESH_EVERY_MS = 300000;
// The alert rules (thresholds drawn, values in red) are read again when the active
// alerts come and go (a rule added and broken, a rule deleted: its alerts close), and
// every minute for the rules that raise none.
const RULES_REFRESH_MS = 60000;
const LOG_LIMIT = 200000;
// The history's bucket widths (docs/history.md), in seconds.
const WIDTHS_S = { "1m": 60, "5m": 300, "15m": 900, "1h": 3600, "1d": 86400 };
const UNITS = { temp: "°C", temperature: "°C", humidity: "%", battery: "%" };
const PREFERRED = ["temp", "temperature", "humidity", "battery"];
const TYPE_LABELS = { THRESHOLD: "Threshold", NO_HEARTBEAT: "No heartbeat" };
const OPS = {
  ">": (a, b) => a > b,
  ">=": (a, b) => a >= b,
  "<": (a, b) => a < b,
  "<=": (a, b) => a <= b,
  "==": (a, b) => a === b,
  "!=": (a, b) => a !== b,
};

const $ = (id) => document.getElementById(id);

// A map keyed by names that come from devices and tenants: with no prototype, a metric
// named "constructor", "toString" or "__proto__" is a key like any other (in a plain
// object it found Object.prototype's, and the page threw on every reading of it).
const dict = () => Object.create(null);
const own = (table, key, otherwise) => (Object.hasOwn(table, key) ? table[key] : otherwise);

const seenText = (device) => (device.lastSeen === null ? "never seen" : `seen ${ago(device.lastSeen)}`);

// A node's text, written only when it changes: a write of the same text still
// replaces the node's text and has the page laid out again.
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function formatValue(value) {
  if (typeof value === "boolean") return value ? "on" : "off";
  if (typeof value !== "number") return "–";
  const abs = Math.abs(value);
  return abs >= 1000 ? value.toFixed(0) : abs >= 100 ? value.toFixed(1) : value.toFixed(abs < 10 ? 2 : 1);
}

// A range of the picker, as it says it (600: "10 min").
function duration(s) {
  return s < 3600 ? `${s / 60} min` : s < 86400 ? `${s / 3600} h` : `${s / 86400} d`;
}

function ago(ms) {
  if (ms === null) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

// A moment in the viewer's locale and time zone: the time alone when it is today,
// else with the date (and the year when it is not this year's). Every time the page
// shows is such (the latest events' were UTC, without a date, beside a token expiry in
// local time); the exact UTC instant is in its title.
function localMoment(date, { seconds = false } = {}, now = new Date()) {
  const options = { hour: "numeric", minute: "2-digit" };
  if (seconds) options.second = "2-digit";
  if (date.toDateString() !== now.toDateString()) {
    Object.assign(options, { month: "short", day: "numeric" });
    if (date.getFullYear() !== now.getFullYear()) options.year = "numeric";
  }
  return date.toLocaleString(undefined, options);
}

// The preferred metrics first (temperature before battery), then by name.
const preferredFirst = (a, b) =>
  (PREFERRED.indexOf(a) + 1 || 99) - (PREFERRED.indexOf(b) + 1 || 99) || a.localeCompare(b);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A message that ends like a sentence, so that another may follow it on the same line.
const sentence = (text) => (/[.!?]$/.test(text) ? text : `${text}.`);

class Dashboard {
  constructor(session) {
    this.session = session;
    this.devices = new Map();
    this.alerts = [];
    this.rules = [];
    this.rulesText = "[]"; // as read: a read that changed nothing renders nothing
    this.rulesReading = false;
    this.rulesAgain = false; // asked for again while read
    this.alertIds = null; // the active alerts' ids, as last pushed or read
    this.summary = null;
    this.pending = [];
    this.recent = [];
    this.metricsSeen = new Set(); // listed in the chart picker
    this.chartMetric = null;
    this.metricPicked = false; // by the viewer, in the picker
    this.filter = "";
    this.arrivals = [];
    this.liveFrom = null; // events up to this id are replayed at start, for the table
    this.refreshedAt = 0; // when the device list was last fetched
    this.refreshing = false;
    this.refreshTimer = null;
    this.historyWaiting = false; // the histories wait for the stream's position
    this.historyStarted = false;
    this.historyQueue = []; // devices whose cards were seen, waiting for their history
    this.historyActive = 0; // history requests in flight
    this.historyMissed = new Set(); // devices whose history could not be loaded
    // Which cards are on screen (or within a screen's margin of it): only those build
    // their charts and ask for their history.
    this.observer = new IntersectionObserver((entries) => this.seen(entries), { rootMargin: "200px 0px" });
    this.rangeS = DEFAULT_RANGE_S;
    this.historyLoads = 0; // range changes: a later load wins over an earlier one
    // What was rendered, in order: for tests and debugging (window.pulseDashboard).
    // history: per device, its seam and how many readings its history counted.
    this.log = { ids: [], count: 0, history: dict(), skipped: 0 };
    this.alertsLoaded = false;
    this.alertsPartial = false;
    this.failed = new Set(); // parts of the page given up on
    this.stopped = false;
    this.telemetry = new TelemetryStream(session, {
      onEvents: (event) => this.pending.push(event),
      onTrimmed: (first, last) => {
        const which = first === last ? `Event #${first} is` : `Events #${first} to #${last} are`;
        problems.set(
          "trimmed",
          `${which} not shown: the server no longer keeps them (they were older than its retention when this page asked). Live telemetry goes on from #${last + 1}.`,
        );
      },
      onState: () => {
        if (this.historyWaiting && this.telemetry.state === "live") this.startHistory();
        this.renderConnection();
      },
      onAuthError: (error) => signOut(error.message),
      onFatal: (error) => this.fail("telemetry", `Live telemetry refused: ${sentence(error.message)}`, error),
    });
    this.fleet = new FleetSocket(session, {
      onSummary: (summary) => this.setSummary(summary),
      onAlerts: (alerts) => {
        this.setAlerts(alerts, alerts.length >= ALERTS_PUSHED);
        this.alertsMoved(alerts);
      },
      onState: () => this.renderConnection(),
      onAuthError: (error) => signOut(error.message),
      onFatal: (error) => {
        this.fail("fleet", `Fleet status and alerts refused: ${sentence(error.message)}`, error);
        if (!this.alertsLoaded) this.renderAlertsUnknown("Alerts could not be loaded.");
      },
    });
    this.timers = [];
  }

  async start() {
    this.renderWho();
    // The first paint from the REST API, retried while the server is busy or
    // unreachable; the streams keep it current from there.
    const backoff = new Backoff(1000, 15000);
    let loaded = false;
    while (!loaded && !this.stopped) {
      try {
        await this.load();
        loaded = true;
        problems.clear("load");
      } catch (error) {
        if (!(error instanceof ApiError && error.transient)) throw error;
        problems.set("load", `Could not load the dashboard: ${sentence(error.message)} Retrying.`);
        await sleep(backoff.next());
      }
    }
    if (this.stopped) return;
    // The live stream first, from the tenant's newest event id (less a few, for the
    // table of latest events; with no devices yet, a replay for the charts of those
    // to come). The histories follow: their seams are never older than that id.
    const newest = await this.newestId();
    if (this.stopped) return;
    if (newest !== null) {
      this.liveFrom = newest;
      const replay = this.devices.size ? RECENT_ROWS : BACKFILL_EVENTS;
      this.telemetry.lastEventId = Math.max(0, newest - replay);
    }
    this.telemetry.start();
    this.fleet.start();
    this.timers.push(setInterval(() => this.flush(), FLUSH_MS));
    this.timers.push(setInterval(() => this.tick(), 1000));
    this.timers.push(setInterval(() => this.scheduleDeviceRefresh(), DEVICE_REFRESH_EVERY_MS));
    this.timers.push(setInterval(() => this.refreshRules(), RULES_REFRESH_MS));
    this.onResize = () => this.resizeCharts();
    window.addEventListener("resize", this.onResize);
    // Without a position (the server could not say), a stream opened at "now" might
    // start after a history's snapshot: the histories wait until it is open.
    if (newest !== null) this.startHistory();
    else this.historyWaiting = true;
  }

  // The tenant's newest event id, asked again a few times while the server cannot say.
  async newestId() {
    for (const retry = new Backoff(1000, 8000); !this.stopped; ) {
      const newest = await newestEventId(this.session);
      if (newest !== null || retry.attempt >= NEWEST_ATTEMPTS) return newest;
      await sleep(retry.next());
    }
    return null;
  }

  startHistory() {
    this.historyWaiting = false;
    this.historyStarted = true;
    this.loadHistory();
  }

  // The REST API's view of the fleet. Throws what the page cannot do without:
  // the devices, and any refusal of the token or the tenant.
  async load() {
    const results = await Promise.allSettled([
      this.session.requestAll("/api/v1/customer/devices", "devices"),
      this.session.request("GET", "/api/v1/customer/fleet/summary"),
      this.session.request("GET", "/api/v1/customer/alerts", { status: "active" }),
      this.session.requestAll("/api/v1/customer/alert-rules", "rules"),
    ]);
    const errors = results.filter((r) => r.status === "rejected").map((r) => r.reason);
    const blocking =
      errors.find((e) => e instanceof AuthError) ||
      errors.find(isTenantProblem) ||
      (results[0].status === "rejected" ? results[0].reason : null);
    if (blocking) throw blocking;
    const [devices, summary, alerts, rules] = results.map((r) => r.value);
    this.setDevices(devices);
    this.refreshedAt = Date.now();
    // The fleet WebSocket sends the summary and the alerts too: without them here
    // the page waits for it. Without the rules, it cannot ask again.
    if (summary) this.setSummary(summary);
    if (alerts) {
      this.setAlerts(alerts.alerts, Boolean(alerts.next_cursor));
      this.alertIds = alertIds(alerts.alerts);
    }
    if (rules) this.setRules(rules);
    else if (!optional(results[3].reason)) {
      problems.set("rules", `Could not load the alert rules: ${sentence(results[3].reason.message)}`);
    }
  }

  // The charts' histories over the chosen range, again (at start, and when the range
  // changes): each asked for once its card is on screen (or nearly), a few at a time.
  // A page of 426 devices asked for all 426 at first (10.7 s), and built their charts.
  loadHistory() {
    this.historyLoads += 1;
    this.historyQueue = [];
    this.historyMissed.clear();
    problems.clear("history");
    for (const device of this.devices.values()) this.wantHistory(device);
  }

  // A device's history, when its card is seen and it has none of this range yet.
  wantHistory(device) {
    if (!this.historyStarted || !device.visible || device.historyLoad === this.historyLoads) return;
    device.historyLoad = this.historyLoads;
    this.historyQueue.push(device);
    this.pumpHistory();
  }

  pumpHistory() {
    while (this.historyActive < HISTORY_CONCURRENCY && this.historyQueue.length && !this.stopped) {
      const device = this.historyQueue.shift();
      if (this.devices.get(device.id) !== device) continue; // deleted meanwhile
      if (!device.visible) {
        device.historyLoad = null; // scrolled past before its turn: asked when seen again
        continue;
      }
      this.historyActive += 1;
      this.fetchHistory(device, this.historyLoads)
        .catch((error) => {
          if (error instanceof AuthError) signOut(error.message);
          else console.error("history:", error);
        })
        .finally(() => {
          this.historyActive -= 1;
          this.pumpHistory();
        });
    }
  }

  async fetchHistory(device, load) {
    const current = () => !this.stopped && load === this.historyLoads;
    // Live events of the device from now on are kept aside: those after its seam are
    // charted again once the history has replaced its chart.
    device.loading = [];
    // A server busy or restarting is asked again, after the wait it asks for,
    // quietly and for as long as it takes: else the chart stays without history.
    const backoff = new Backoff(1000, HISTORY_RETRY_CAP_MS);
    let named = this.historyMetrics(device, false);
    while (current()) {
      try {
        // No "to": the server's default holds every reading committed before its
        // snapshot, whatever the clocks, which the seam needs.
        const from = new Date(Date.now() - this.rangeS * 1000);
        const params = { from: from.toISOString(), agg: "avg,last,count" };
        if (named) params.metrics = named.join(",");
        const body = await this.session.request(
          "GET",
          `/api/v1/customer/devices/${encodeURIComponent(device.id)}/telemetry`,
          params,
        );
        if (!current()) return;
        this.applyHistory(device, body);
        this.historyMissed.delete(device.id);
        break;
      } catch (error) {
        if (error instanceof AuthError) throw error;
        if (error instanceof ApiError && error.transient) {
          await sleep(retryDelay(error, backoff));
          continue;
        }
        if (!named && error instanceof ApiError && error.status === 400) {
          // Too many points in all its series, or more metrics than an answer holds
          // (100, more than the page keeps: its card says there are more; see
          // docs/history.md): those it can show.
          if (/more than \d+ metrics/.test(error.message) && !device.untracked) {
            device.untracked = true;
            device.dirty = true;
          }
          named = this.historyMetrics(device, true);
          continue;
        }
        if (!current()) return;
        device.loading = null; // its chart goes on with the live readings it has
        if (!optional(error)) this.historyMissed.add(device.id);
        break;
      }
    }
    if (!current()) return;
    const missed = [...this.historyMissed];
    if (missed.length) {
      const which = missed.length === 1 ? `of ${missed[0]}` : `of ${missed.length} devices`;
      problems.set("history", `The history ${which} could not be loaded: its chart shows live readings only.`);
    } else problems.clear("history");
  }

  // The metrics to ask a device's history for: none named (every one) until the device
  // is known to have more than the page keeps, or when `always`; then those it keeps
  // (with the preferred and the chart's when there is room).
  historyMetrics(device, always) {
    if (!always && device.tracked.size < METRICS_PER_DEVICE) return null;
    const names = new Set(device.tracked);
    for (const name of [this.chartMetric, ...PREFERRED]) {
      if (name && names.size < METRICS_PER_DEVICE) names.add(name);
    }
    return [...names];
  }

  // Whether the page keeps a device's metric, taking it while there is room.
  tracks(device, name) {
    if (device.tracked.has(name)) return true;
    if (device.tracked.size >= METRICS_PER_DEVICE) {
      if (!device.untracked) {
        device.untracked = true;
        device.dirty = true;
      }
      return false;
    }
    device.tracked.add(name);
    device.order = null;
    if (!this.metricsSeen.has(name)) this.addMetric(name);
    return true;
  }

  // A device's chart from its history (points of every metric it keeps on one time
  // axis), and its latest values where the stream has not given newer ones.
  applyHistory(device, body) {
    const toSeconds = (iso) => Date.parse(iso) / 1000;
    const byPreference = Object.keys(body.series).sort(preferredFirst);
    const kept = byPreference.filter((name) => this.tracks(device, name));
    const times = [
      ...new Set(kept.flatMap((name) => body.series[name].map((p) => toSeconds(p.t)))),
    ].sort((a, b) => a - b);
    const index = new Map(times.map((t, i) => [t, i]));
    device.times = times;
    device.series = dict();
    device.counts = dict();
    let counted = 0;
    // Live readings go into buckets of the history's width (raw: a point each), each
    // weighed by the readings the history counted in it.
    device.widthS = own(WIDTHS_S, body.bucket, 0);
    for (const points of Object.values(body.series)) {
      counted = Math.max(counted, points.reduce((sum, p) => sum + p.count, 0));
    }
    for (const name of kept) {
      const points = body.series[name];
      const values = times.map(() => null);
      const counts = times.map(() => 0);
      for (const point of points) {
        const at = index.get(toSeconds(point.t));
        values[at] = point.avg;
        counts[at] = point.count;
      }
      device.series[name] = values;
      device.counts[name] = counts;
      // Its last value, unless the stream gave one of a later time (its bucket's start:
      // a live reading in that bucket is taken as the later).
      const last = points.at(-1);
      if (last) this.setLatest(device, name, last.last, toSeconds(last.t), 0);
    }
    device.seam = Math.max(device.seam ?? 0, body.last_event_id);
    // Live events charted while the history loaded: those after its seam, again.
    const held = device.loading || [];
    device.loading = null;
    for (const event of held) if (event.id > device.seam) this.chartReading(device, event);
    this.log.history[device.id] = { seam: device.seam, bucket: body.bucket, points: times.length };
    this.log.history[device.id].readings = counted;
    device.dirty = device.chartDirty = true;
    device.chartAt = 0;
  }

  setRange(seconds) {
    this.rangeS = seconds;
    if (this.historyStarted) this.loadHistory();
  }

  // Part of the page cannot work and the page cannot mend it: say so, in one line.
  fail(part, message, error) {
    if (isTenantProblem(error)) {
      chooseTenant(error);
      return;
    }
    problems.set(part, message);
    this.failed.add(part);
    if (part === "load") this.renderAlertsUnknown("Alerts could not be loaded.");
    this.renderConnection();
  }

  stop() {
    this.stopped = true;
    this.telemetry.stop();
    this.fleet.stop();
    this.timers.forEach(clearInterval);
    this.observer.disconnect();
    clearTimeout(this.refreshTimer);
    if (this.onResize) window.removeEventListener("resize", this.onResize);
  }

  // --- data in -----------------------------------------------------------

  // The device list again, soon but not sooner than the list's size allows (see
  // DEVICE_REFRESH_MIN_MS): the whole list is some 180 bytes a device.
  scheduleDeviceRefresh() {
    if (this.refreshTimer !== null || this.refreshing || this.stopped) return;
    const gap = Math.min(
      DEVICE_REFRESH_MAX_MS,
      Math.max(DEVICE_REFRESH_MIN_MS, this.devices.size * DEVICE_REFRESH_PER_DEVICE_MS),
    );
    const wait = Math.max(300, this.refreshedAt + gap - Date.now());
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      this.refreshDevices();
    }, wait);
  }

  async refreshDevices() {
    this.refreshing = true;
    this.refreshedAt = Date.now();
    try {
      this.setDevices(await this.session.requestAll("/api/v1/customer/devices", "devices"));
    } catch (error) {
      if (error instanceof AuthError) signOut(error.message);
    } finally {
      this.refreshing = false;
    }
    // The summary moved again while the list was read.
    if (this.summary && this.disagrees(this.summary)) this.scheduleDeviceRefresh();
  }

  // The summary's counts are not those of the cards shown.
  disagrees(summary) {
    if (summary.total !== this.devices.size) return true;
    const counts = { ONLINE: 0, STALE: 0, OFFLINE: 0 };
    for (const device of this.devices.values()) counts[device.status] = (counts[device.status] || 0) + 1;
    return ["ONLINE", "STALE", "OFFLINE"].some((status) => counts[status] !== summary[status]);
  }

  // The whole list (every page of it): a card whose device is not in it any more was
  // deleted, and goes.
  setDevices(list) {
    const listed = new Set(list.map((info) => info.device_id));
    for (const [id, device] of this.devices) {
      if (listed.has(id)) continue;
      this.observer.unobserve(device.nodes.card);
      device.nodes.card.remove();
      this.devices.delete(id);
    }
    for (const info of list) {
      const device = this.device(info.device_id);
      device.info = info;
      device.status = info.status;
      const seen = info.last_seen_at ? Date.parse(info.last_seen_at) : null;
      if (seen !== null && (device.lastSeen === null || seen > device.lastSeen)) device.lastSeen = seen;
      this.renderDeviceInfo(device);
    }
    $("devices-empty").hidden = this.devices.size > 0;
  }

  setSummary(summary) {
    const alertsChanged = !this.summary || this.summary.active_alerts !== summary.active_alerts;
    this.summary = summary;
    if (alertsChanged && this.alertsLoaded) this.renderAlerts();
    $("sum-total").textContent = summary.total;
    $("sum-online").textContent = summary.ONLINE;
    $("sum-stale").textContent = summary.STALE;
    $("sum-offline").textContent = summary.OFFLINE;
    $("sum-alerts").textContent = summary.active_alerts;
    // Device statuses moved in a way the cards do not show: fetch them so that the
    // cards agree with the numbers.
    if (this.disagrees(summary)) this.scheduleDeviceRefresh();
  }

  // Active alerts raised or gone (not only acknowledged): a rule may have been added or
  // deleted. The rules were read once, at load: a rule added while the page was open
  // drew no threshold and no red value, a deleted one kept them.
  alertsMoved(alerts) {
    const ids = alertIds(alerts);
    if (ids === this.alertIds) return;
    this.alertIds = ids;
    this.refreshRules();
  }

  // The tenant's rules again, one read at a time (one more after it when asked meanwhile).
  async refreshRules() {
    if (this.rulesReading) {
      this.rulesAgain = true;
      return;
    }
    this.rulesReading = true;
    try {
      do {
        this.rulesAgain = false;
        const rules = await this.session.requestAll("/api/v1/customer/alert-rules", "rules");
        if (this.stopped) return;
        this.setRules(rules);
      } while (this.rulesAgain);
    } catch (error) {
      // Else the rules shown stay, until the next change of the alerts or minute.
      if (error instanceof AuthError && !this.stopped) signOut(error.message);
    } finally {
      this.rulesReading = false;
    }
  }

  setRules(rules) {
    problems.clear("rules");
    const text = JSON.stringify(rules);
    if (text === this.rulesText) return;
    this.rules = rules;
    this.rulesText = text;
    for (const device of this.devices.values()) {
      device.dirty = device.chartDirty = true;
      device.chartAt = 0;
    }
  }

  // `partial`: the newest of more (a page of the REST list, the WebSocket's 100).
  setAlerts(alerts, partial = this.alertsPartial) {
    this.alertsLoaded = true;
    this.alertsPartial = partial;
    this.alerts = alerts.filter((a) => a.status !== "CLOSED");
    this.renderAlerts();
  }

  // --- rendering -----------------------------------------------------------

  device(id) {
    let device = this.devices.get(id);
    if (!device) {
      device = {
        id,
        info: null,
        status: "OFFLINE",
        lastSeen: null,
        latest: dict(),
        tracked: new Set(), // the metrics the page keeps (METRICS_PER_DEVICE)
        untracked: false, // the device sent more
        order: null, // the names its card shows, in order
        times: [],
        latestAt: dict(), // by metric: [device time (s), event id] of its latest value
        series: dict(),
        counts: dict(), // by metric, readings averaged into each point of its series
        widthS: this.liveWidth(), // the history's bucket width: live readings are averaged into such buckets
        dirty: false,
        chartDirty: false,
        chartAt: 0,
        visible: false, // its card is on screen, or near it
        historyLoad: null, // the history load (historyLoads) its history was asked for in
      };
      this.devices.set(id, device);
      this.createCard(device);
    }
    return device;
  }

  createCard(device) {
    const card = el("article", "device");
    card.dataset.deviceId = device.id;
    card.dataset.status = device.status;
    // Reached by Tab, named by its device and status (a screen reader's list of cards).
    card.tabIndex = 0;
    const head = el("div", "device-head");
    const dot = el("span", "status-dot");
    dot.setAttribute("aria-hidden", "true");
    head.append(dot);
    const name = el("span", "device-name", device.id);
    const badge = el("span", "badge", device.status);
    head.append(name, badge);
    const id = el("div", "device-id");
    const metrics = el("div", "metrics");
    const chart = el("div", "chart");
    chart.setAttribute("role", "img"); // named by what it shows (renderChart)
    const foot = el("div", "device-foot");
    const seen = el("span", "seen", seenText(device));
    const last = el("span", "last-id");
    foot.append(seen, last);
    const more = el("div", "more-metrics", `It sends more than ${METRICS_PER_DEVICE} metrics: the first ${METRICS_PER_DEVICE} are shown.`);
    more.hidden = true;
    card.append(head, id, metrics, more, chart, foot);
    device.nodes = { card, name, badge, id, metrics, more, chart, seen, last, values: dict() };
    // Keep the grid in device id order (the list comes in that order: at the end).
    const grid = $("device-grid");
    const end = grid.lastElementChild;
    const after =
      end && end.dataset.deviceId > device.id
        ? [...grid.children].find((c) => c.dataset.deviceId > device.id)
        : null;
    grid.insertBefore(card, after);
    this.applyFilter(device);
    this.observer.observe(card);
  }

  // Cards come on screen or go: one on screen gets its chart and its history.
  seen(entries) {
    for (const entry of entries) {
      const device = this.devices.get(entry.target.dataset.deviceId);
      if (!device || device.nodes.card !== entry.target) continue;
      device.visible = entry.isIntersecting;
      if (!device.visible) continue;
      if (!device.chart) device.chartDirty = true;
      this.wantHistory(device);
    }
  }

  renderDeviceInfo(device) {
    const { card, name, badge, id } = device.nodes;
    const info = device.info || {};
    name.textContent = info.name || device.id;
    name.title = name.textContent; // shown whole on hover when it is cut short
    // The id line adds what the name does not say already.
    id.textContent = [info.name ? device.id : "", info.site_id || ""].filter(Boolean).join(" · ");
    card.dataset.status = device.status;
    badge.textContent = device.status;
    const named = info.name ? `${info.name} (${device.id})` : device.id;
    card.setAttribute("aria-label", `${named}, ${device.status.toLowerCase()}`);
    this.applyFilter(device);
  }

  flush() {
    if (this.pending.length) {
      const batch = this.pending;
      this.pending = [];
      const now = Date.now();
      const shown = [];
      for (const event of batch) {
        this.recent.unshift(event);
        shown.push(event);
        try {
          this.apply(event, now);
        } catch (error) {
          // One event the page cannot show must not take the rest of the batch with it.
          console.error(`event #${event.id}:`, error);
        }
      }
      this.recent.length = Math.min(this.recent.length, RECENT_ROWS);
      if (shown.length) this.renderRecent(shown[shown.length - 1]);
      for (const event of shown) this.record(event.id);
    }
    // Values changed by live events or by a history load.
    for (const device of this.devices.values()) if (device.dirty) this.renderValues(device);
    const now = Date.now();
    // Charts of the cards on screen only: the others are drawn when they come into view.
    for (const device of this.devices.values()) {
      if (!device.visible || !device.chartDirty) continue;
      if (now - device.chartAt >= CHART_EVERY_MS) this.renderChart(device, now);
    }
  }

  apply(event, now) {
    // A device created since the list was fetched: fetch its name and status.
    if (!this.devices.has(event.device_id)) this.scheduleDeviceRefresh();
    const device = this.device(event.device_id);
    if (device.seam !== undefined && event.id <= device.seam) {
      this.log.skipped += 1; // in the device's history already
      return;
    }
    const metrics = event.data.metrics;
    const t = Date.parse(event.data.time) / 1000;
    for (const name of Object.keys(metrics)) {
      if (this.tracks(device, name)) this.setLatest(device, name, metrics[name], t, event.id);
    }
    const seen = Math.min(now, t * 1000);
    if (device.lastSeen === null || seen > device.lastSeen) device.lastSeen = seen;
    device.lastId = event.id;
    const live = this.liveFrom === null || event.id > this.liveFrom;
    // A reading committed makes its device ONLINE (docs/fleet.md): the card says so
    // without fetching the list.
    if (live && device.status !== "ONLINE") {
      device.status = "ONLINE";
      this.renderDeviceInfo(device);
    }
    if (device.loading) {
      device.loading.push(event);
      if (device.loading.length > LOADING_EVENTS) device.loading.shift();
    }
    this.chartReading(device, event);
    device.dirty = device.chartDirty = true;
    if (live) this.arrivals.push(now);
  }

  // A metric's value as its device's latest, unless the device sent a later one: by
  // device time, then by event id. A reading a gateway delivers late (buffered, its
  // time older) arrives after newer ones, and showed as current.
  setLatest(device, name, value, t, id) {
    const [at, atId] = own(device.latestAt, name, [-Infinity, -1]);
    if (t < at || (t === at && id < atId)) return;
    device.latest[name] = value;
    device.latestAt[name] = [t, id];
  }

  // An event's readings on its device's chart, at their place in time: a reading
  // delivered late went at the end, and uPlot drew a line back across the chart.
  chartReading(device, event) {
    const metrics = event.data.metrics;
    const t = Date.parse(event.data.time) / 1000;
    // In the bucket of a point: averaged into it. A point per reading over a range of
    // days grew without end (604,800 a week per device at 1 a second).
    const width = device.widthS;
    const start = width ? Math.floor(t / width) * width : t;
    const times = device.times;
    const newest = times.length ? Math.max(times.at(-1), t) : t;
    if (!(t >= newest - this.rangeS)) return; // older than the chart's range (or no time)
    // After every point not later than it: a late reading is a few steps from the end.
    let at = times.length;
    while (at > 0 && times[at - 1] > start) at -= 1;
    if (width > 0 && at > 0 && times[at - 1] === start) at -= 1;
    else {
      times.splice(at, 0, start);
      for (const name of Object.keys(device.series)) {
        device.series[name].splice(at, 0, null);
        device.counts[name].splice(at, 0, 0);
      }
    }
    for (const name of device.tracked) {
      const value = own(metrics, name, undefined);
      if (typeof value !== "number") continue;
      if (!device.series[name]) {
        device.series[name] = times.map(() => null);
        device.counts[name] = times.map(() => 0);
      }
      const values = device.series[name];
      const counts = device.counts[name];
      const weight = counts[at];
      values[at] = weight && values[at] !== null ? (values[at] * weight + value) / (weight + 1) : value;
      counts[at] = weight + 1;
    }
    this.trim(device, newest);
  }

  // A device with no history yet: the bucket width its range's history would have
  // (docs/history.md, bucket=auto), or a point per reading up to an hour.
  liveWidth() {
    if (this.rangeS <= 3600) return 0;
    return Object.values(WIDTHS_S).find((w) => this.rangeS / w <= 1000) ?? WIDTHS_S["1d"];
  }

  record(id) {
    this.log.count += 1;
    this.log.ids.push(id);
    // Cut a quarter at a time: a splice per event, once full, cost 18 µs an event.
    if (this.log.ids.length > LOG_LIMIT * 1.25) this.log.ids.splice(0, this.log.ids.length - LOG_LIMIT);
  }

  trim(device, newest) {
    let drop = 0;
    while (drop < device.times.length && device.times[drop] < newest - this.rangeS) drop += 1;
    if (drop) {
      device.times.splice(0, drop);
      for (const values of Object.values(device.series)) values.splice(0, drop);
      for (const counts of Object.values(device.counts)) counts.splice(0, drop);
    }
  }

  // A name for the chart picker, in its place (up to METRICS_LISTED; then a last,
  // disabled option says that there are more).
  addMetric(name) {
    const select = $("chart-metric");
    if (this.metricsSeen.size >= METRICS_LISTED) {
      if (!select.querySelector("option[data-more]")) {
        const more = new Option(`(first ${METRICS_LISTED} metrics listed)`, "");
        more.disabled = true;
        more.dataset.more = "";
        select.append(more);
      }
      return;
    }
    this.metricsSeen.add(name);
    const option = new Option(name, name);
    option.title = name;
    const after = [...select.options].find((o) => !("more" in o.dataset) && preferredFirst(o.value, name) > 0);
    select.insertBefore(option, after || select.querySelector("option[data-more]"));
    // Until someone picks one, the most preferred seen so far (history comes in
    // alphabetical order: battery before temp).
    const first = select.options[0].value;
    if (!this.metricPicked && this.chartMetric !== first) this.setChartMetric(first, false);
    select.value = this.chartMetric;
  }

  renderValues(device) {
    device.dirty = false;
    const { metrics, values, seen, last, more } = device.nodes;
    // The names shown change as the device sends new ones (tracks() forgets the order):
    // the tiles follow, those no longer among them go. A tile left behind kept its old
    // value, shown as current, and a card had more than four.
    const reorder = !device.order;
    if (reorder) {
      device.order = Object.keys(device.latest).sort(preferredFirst).slice(0, 4);
      for (const [name, node] of Object.entries(values)) {
        if (device.order.includes(name)) continue;
        node.remove();
        delete values[name];
      }
    }
    more.hidden = !device.untracked;
    for (const name of device.order) {
      let node = values[name];
      if (!node) {
        node = el("div", "metric");
        node.dataset.metric = name;
        const value = el("span", "value");
        const unit = el("span", "unit", own(UNITS, name, ""));
        const line = el("div");
        line.append(value, unit);
        const label = el("span", "name", name);
        label.title = name;
        node.append(line, label);
        metrics.append(node);
        values[name] = node;
        node.valueNode = value;
      }
      const v = device.latest[name];
      node.valueNode.textContent = formatValue(v);
      node.classList.toggle("breach", this.breaches(device.id, name, v));
    }
    if (reorder) metrics.replaceChildren(...device.order.map((name) => values[name]));
    setText(seen, seenText(device));
    last.textContent = device.lastId ? `#${device.lastId}` : "";
  }

  renderChart(device, now) {
    device.chartDirty = false;
    device.chartAt = now;
    const metric = this.chartMetric;
    if (!metric || !window.uPlot) return;
    if (!device.chart) device.chart = new Sparkline(device.nodes.chart);
    const [times, values] = withGaps(device.times, device.series[metric] || []);
    device.chart.setData(times, values, this.thresholds(device.id, metric));
    // Its name, for a screen reader: what it shows, in words.
    const shown = values.filter((v) => v !== null);
    let what = "no readings";
    if (shown.length) {
      const low = formatValue(shown.reduce((a, b) => Math.min(a, b)));
      const high = formatValue(shown.reduce((a, b) => Math.max(a, b)));
      what = `${shown.length} ${shown.length === 1 ? "point" : "points"}, ${low} to ${high}`;
    }
    device.nodes.chart.setAttribute("aria-label", `${metric} over the last ${duration(this.rangeS)}: ${what}`);
  }

  resizeCharts() {
    for (const device of this.devices.values()) if (device.chart) device.chart.resize();
  }

  renderRecent(newest) {
    const rows = this.recent.map((event) => {
      const tr = el("tr");
      tr.dataset.id = event.id;
      const names = Object.keys(event.data.metrics);
      let metrics = names
        .slice(0, EVENT_METRICS)
        .map((k) => `${k}=${formatValue(event.data.metrics[k])}`)
        .join("  ");
      if (names.length > EVENT_METRICS) metrics += `  … ${names.length - EVENT_METRICS} more`;
      const device = el("td", "device-cell", event.device_id);
      device.title = event.device_id;
      const cell = el("td");
      const text = el("div", "event-metrics", metrics);
      text.title = metrics;
      cell.append(text);
      const time = el("td", "", "–");
      const at = new Date(event.data.time);
      if (!Number.isNaN(at.getTime())) {
        time.textContent = localMoment(at, { seconds: true });
        time.title = at.toISOString();
      }
      tr.append(el("td", "num", String(event.id)), time, device, cell);
      return tr;
    });
    $("event-rows").replaceChildren(...rows);
    $("last-event").textContent = `last event #${newest.id}`;
  }

  renderAlerts() {
    const list = $("alert-list");
    const alerting = new Set(this.alerts.map((a) => a.device_id));
    const items = this.alerts.map((alert) => {
      const li = el("li", "alert");
      li.dataset.alertId = alert.alert_id;
      li.dataset.status = alert.status;
      li.dataset.severity = alert.severity;
      const head = el("div", "alert-head");
      head.append(
        el("span", "alert-type", `S${alert.severity} · ${own(TYPE_LABELS, alert.alert_type, alert.alert_type)}`),
        el("span", "alert-device", alert.device_id || ""),
        el("span", "alert-age", ago(Date.parse(alert.created_at))),
      );
      const created = new Date(alert.created_at);
      if (!Number.isNaN(created.getTime())) head.lastChild.title = `Raised ${localMoment(created)}`;
      const foot = el("div", "alert-foot");
      foot.append(el("span", "alert-status", alert.status));
      if (this.session.canManage) {
        const actions = el("div", "actions");
        if (alert.status === "OPEN") actions.append(this.alertButton(alert, "acknowledge", "Acknowledge"));
        actions.append(this.alertButton(alert, "close", "Close"));
        foot.append(actions);
      }
      li.append(head, el("div", "alert-summary", alert.summary), foot);
      return li;
    });
    list.replaceChildren(...items);
    $("alerts-empty").textContent = "No active alerts.";
    $("alerts-empty").hidden = this.alerts.length > 0;
    // The list is the newest of more (the REST API's first page, the fleet WebSocket's
    // newest ALERTS_PUSHED): the summary's count, where known, is the total.
    const partial = this.alertsPartial;
    const total = partial && this.summary ? Math.max(this.alerts.length, this.summary.active_alerts) : this.alerts.length;
    const count = partial && !this.summary ? `${total}+` : String(total);
    const shown = this.alerts.length < total ? `${this.alerts.length} of ${total}` : count;
    $("alert-count").textContent = this.alerts.length ? shown : "";
    // Visible from another tab: the count of active alerts in the title.
    const title = `Pulse · ${this.session.tenantName || "fleet"}`;
    document.title = this.alerts.length ? `(${count}) ${title}` : title;
    for (const device of this.devices.values()) {
      device.nodes.card.classList.toggle("has-alert", alerting.has(device.id));
    }
  }

  renderAlertsUnknown(message) {
    $("alert-list").replaceChildren();
    $("alerts-empty").textContent = message;
    $("alerts-empty").hidden = false;
    $("alert-count").textContent = "";
  }

  alertButton(alert, action, label) {
    const button = el("button", "small", label);
    button.type = "button";
    // Which alert, for a screen reader's list of buttons (a dozen say "Close").
    const type = own(TYPE_LABELS, alert.alert_type, alert.alert_type);
    button.setAttribute("aria-label", `${label} alert: ${alert.summary || type}${alert.device_id ? ` (${alert.device_id})` : ""}`);
    button.dataset.action = action;
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        const updated = await this.session.request(
          "POST",
          `/api/v1/customer/alerts/${encodeURIComponent(alert.alert_id)}/${action}`,
        );
        // The WebSocket pushes the new list too; this makes the click feel immediate.
        if (updated && updated.alert_id !== undefined) {
          this.setAlerts(this.alerts.map((a) => (a.alert_id === updated.alert_id ? updated : a)));
        }
      } catch (error) {
        button.disabled = false;
        if (error instanceof AuthError) signOut(error.message);
        else toast(`Could not ${action} the alert: ${error.message}`);
      }
    });
    return button;
  }

  tick() {
    const now = Date.now();
    for (const device of this.devices.values()) {
      setText(device.nodes.seen, seenText(device));
    }
    while (this.arrivals.length && this.arrivals[0] < now - 5000) this.arrivals.shift();
    setText($("rate"), `${(this.arrivals.length / 5).toFixed(1)} events/s`);
    const alerts = new Map(this.alerts.map((a) => [String(a.alert_id), a]));
    for (const node of document.querySelectorAll(".alert")) {
      const alert = alerts.get(node.dataset.alertId);
      if (alert) setText(node.querySelector(".alert-age"), ago(Date.parse(alert.created_at)));
    }
    this.renderConnection();
  }

  renderConnection() {
    const states = [this.telemetry.state, this.fleet.state];
    const state = this.failed.has("load")
      ? "offline"
      : states.every((s) => s === "live")
      ? "live"
      : states.includes("offline")
        ? "offline"
        : states.includes("reconnecting")
          ? "reconnecting"
          : "connecting";
    const node = $("connection");
    node.dataset.state = state;
    node.dataset.telemetry = this.telemetry.state;
    node.dataset.fleet = this.fleet.state;
    $("connection-label").textContent = { live: "Live", offline: "Offline", reconnecting: "Reconnecting", connecting: "Connecting" }[state];
    const details = [];
    if (this.failed.has("load")) details.push("not loaded");
    else {
      if (this.telemetry.state !== "live") details.push(`telemetry: ${this.telemetry.detail || this.telemetry.state}`);
      if (this.fleet.state !== "live") details.push(`fleet: ${this.fleet.detail || this.fleet.state}`);
    }
    $("connection-detail").textContent = details.join(" · ");
    node.title = details.join("\n");
    const banner = $("banner");
    if (this.telemetry.limited || this.fleet.limited) {
      // Every tab and client of the tenant counts: the person can free a connection.
      const since = this.telemetry.lastEventId;
      banner.textContent =
        "Live updates are paused: this tenant has reached its limit of open live connections. " +
        "Close Pulse tabs or windows you do not need; this page tries again every few seconds" +
        (since !== null ? ` and then resumes after event #${since}.` : ".");
      banner.hidden = false;
    } else if (state === "reconnecting") {
      const since = this.telemetry.lastEventId;
      banner.textContent =
        "Reconnecting: the values shown may be out of date. Nothing is lost: telemetry resumes" +
        (since !== null ? ` after event #${since}.` : ".");
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
  }

  renderWho() {
    const parts = [];
    const tenant = this.session.tenantName;
    if (tenant) {
      const part = el("span", "", "tenant ");
      part.append(el("strong", "", tenant));
      parts.push(part);
    }
    const roles = this.session.roles.join(", ");
    if (roles) parts.push(el("span", "roles", roles));
    const expires = this.session.expiresAt;
    if (expires) {
      const part = el("span", "expiry", `token until ${localMoment(expires)}`);
      part.title = `The token expires ${expires.toString()}`;
      parts.push(part);
    }
    // Each separator goes with the part before it: a part hidden on phones takes its own.
    parts.slice(0, -1).forEach((part) => part.append(" · "));
    const who = $("who");
    who.replaceChildren(...parts);
    who.title = who.textContent;
  }

  // --- rules ----------------------------------------------------------------

  rulesFor(deviceId, metric) {
    return this.rules.filter((r) => r.metric === metric && (!r.device_id || r.device_id === deviceId));
  }

  thresholds(deviceId, metric) {
    return this.rulesFor(deviceId, metric).map((r) => r.threshold);
  }

  breaches(deviceId, metric, value) {
    if (typeof value !== "number") return false;
    return this.rulesFor(deviceId, metric).some((r) => own(OPS, r.operator, () => false)(value, r.threshold));
  }

  // --- filters ---------------------------------------------------------------

  setChartMetric(metric, picked = true) {
    this.chartMetric = metric;
    this.metricPicked ||= picked;
    for (const device of this.devices.values()) {
      device.chartDirty = true;
      device.chartAt = 0;
    }
  }

  setFilter(text) {
    this.filter = text.trim().toLowerCase();
    for (const device of this.devices.values()) this.applyFilter(device);
  }

  applyFilter(device) {
    if (!device.nodes) return;
    const info = device.info || {};
    const haystack = `${device.id} ${info.name || ""} ${info.site_id || ""}`.toLowerCase();
    device.nodes.card.hidden = Boolean(this.filter) && !haystack.includes(this.filter);
  }
}

const alertIds = (alerts) => alerts.map((a) => String(a.alert_id)).sort().join(",");

// A server without this API (404) leaves its part of the page empty, silently.
function optional(error) {
  return error instanceof ApiError && error.status === 404;
}

// How long to wait before asking a busy server again: at least its Retry-After (and a
// little more, so that the tabs it refused do not all come back at once), else the
// backoff's next wait.
function retryDelay(error, backoff) {
  const wait = backoff.next();
  if (error.retryAfterS === null || error.retryAfterS === undefined) return wait;
  const after = error.retryAfterS * 1000;
  return Math.max(wait, after + Math.random() * Math.max(after, 1000) * 0.5);
}

// What is wrong and the page cannot mend, by part of the page, in one line under the top bar.
const problems = {
  lines: new Map(),
  set(part, message) {
    this.lines.set(part, message);
    this.render();
  },
  clear(part) {
    if (part === undefined) this.lines.clear();
    else this.lines.delete(part);
    this.render();
  },
  render() {
    const node = $("problem");
    node.textContent = [...this.lines.values()].join(" ");
    node.hidden = this.lines.size === 0;
  },
};

let toastTimer = null;
function toast(message) {
  const node = $("toast");
  node.textContent = message;
  node.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (node.hidden = true), 6000);
}

let dashboard = null;

function close() {
  if (dashboard) dashboard.stop();
  dashboard = null;
  problems.clear();
  clearPage();
}

// Nothing of a session outlives it: the next may be another tenant's.
function clearPage() {
  for (const id of ["device-grid", "alert-list", "event-rows", "chart-metric", "who"]) $(id).replaceChildren();
  for (const id of ["sum-total", "sum-online", "sum-stale", "sum-offline", "sum-alerts", "rate"]) {
    $(id).textContent = "–";
  }
  $("alert-count").textContent = "";
  $("last-event").textContent = "no events yet";
  $("devices-empty").hidden = true;
  $("alerts-empty").textContent = "Loading alerts…";
  $("alerts-empty").hidden = false;
  $("banner").hidden = true;
  // The pill said "Live" behind the sign-in form after a token expired.
  showConnection("signed-out", "Signed out");
  document.title = "Pulse · Fleet";
}

// The top bar's pill before a session's streams say more (renderConnection).
function showConnection(state, label) {
  const node = $("connection");
  node.dataset.state = state;
  delete node.dataset.telemetry;
  delete node.dataset.fleet;
  node.title = "";
  $("connection-label").textContent = label;
  $("connection-detail").textContent = "";
}

function signOut(message) {
  close();
  Session.clear();
  showLogin(message);
}

// The token is fine but names no tenant (an operator's) or a malformed one: keep
// the token, ask for the tenant.
function chooseTenant(error) {
  const session = Session.restore();
  close();
  if (!session) return showLogin("");
  const message =
    error.code === "tenant_required"
      ? "This operator token is not tied to a tenant: choose a tenant to open its dashboard."
      : `Choose another tenant: ${error.message}`;
  showLogin(message, session);
}

// The sign-in form; with a session, only its tenant field (to choose a tenant for that token).
function showLogin(message, session = null) {
  const form = $("login");
  form.hidden = false;
  form.dataset.mode = session ? "tenant" : "token";
  $("login-token").required = !session;
  $("login-tenant").required = Boolean(session);
  $("login-tenant").value = session ? session.tenant || "" : $("login-tenant").value;
  const error = $("login-error");
  error.textContent = message || "";
  error.hidden = !message;
  (session ? $("login-tenant") : $("login-token")).focus();
}

async function open(session) {
  $("login").hidden = true;
  problems.clear();
  showConnection("connecting", "Connecting");
  dashboard = new Dashboard(session);
  window.pulseDashboard = {
    get ids() {
      return dashboard ? dashboard.log.ids.slice() : [];
    },
    get count() {
      return dashboard ? dashboard.log.count : 0;
    },
    get lastEventId() {
      return dashboard ? dashboard.telemetry.lastEventId : null;
    },
    get duplicates() {
      return dashboard ? dashboard.telemetry.duplicates : 0;
    },
    get history() {
      return dashboard ? { ...dashboard.log.history, skipped: dashboard.log.skipped } : null;
    },
    get range() {
      return dashboard ? dashboard.rangeS : null;
    },
    // How many points each device's chart holds.
    get points() {
      return dashboard ? Object.fromEntries([...dashboard.devices].map(([id, d]) => [id, d.times.length])) : null;
    },
    // What a device's chart was last given: its times and the charted metric's values.
    chart(id) {
      const device = dashboard && dashboard.devices.get(id);
      return device && device.chart ? device.chart.plot.data.map((values) => Array.from(values)) : null;
    },
    // How many metrics each device's chart keeps.
    get metrics() {
      return dashboard ? Object.fromEntries([...dashboard.devices].map(([id, d]) => [id, d.tracked.size])) : null;
    },
    get connections() {
      return dashboard ? { telemetry: dashboard.telemetry.connections, fleet: dashboard.fleet.connections } : null;
    },
  };
  const opened = dashboard;
  try {
    await opened.start();
  } catch (error) {
    if (dashboard !== opened) return; // signed out meanwhile
    if (error instanceof AuthError) signOut(error.message);
    else if (isTenantProblem(error)) chooseTenant(error);
    else if (error instanceof ApiError && error.status === 403) signOut(`Forbidden: ${error.message}`);
    else opened.fail("load", `Could not load the dashboard: ${sentence(error.message)}`, error);
  }
}

// Signs this tab in as `session`, in place of whatever it showed.
function signIn(session) {
  hideSwitch();
  close();
  Session.store(session.token, session.tenant);
  open(Session.restore());
}

// A #token= link's sign-in. With none in this tab, or one of the same tenant and
// subject (a fresh token), it is taken at once: the link `pulse demo` prints is one
// click. In place of another tenant's or subject's it is asked about, naming both:
// anyone can send a link with their own token (login CSRF), and what the person did
// next (a device added, an alert closed) went to the sender's tenant, unnoticed.
function offer(offered) {
  const current = Session.restore();
  if (current && !current.sameIdentity(offered)) askToSwitch(current, offered);
  else signIn(offered);
}

let switchOffer = null; // the session a link offers while the page asks

// Until "Switch" is clicked this tab keeps its session, its page and its storage.
function askToSwitch(current, offered) {
  switchOffer = offered;
  const name = (session) => session.tenantName || "(no tenant named)";
  const who = (session) => session.subject || "(no subject named)";
  $("switch-to-tenant").textContent = name(offered);
  $("switch-to-subject").textContent = who(offered);
  $("switch-from-tenant").textContent = name(current);
  $("switch-from-subject").textContent = who(current);
  $("switch-confirm").textContent = `Switch to ${name(offered)}`;
  $("switch-stay").textContent = `Stay on ${name(current)}`;
  $("switch").hidden = false;
  $("switch-stay").focus();
}

function hideSwitch() {
  switchOffer = null;
  $("switch").hidden = true;
}

function main() {
  $("switch-confirm").addEventListener("click", () => switchOffer && signIn(switchOffer));
  $("switch-stay").addEventListener("click", hideSwitch);
  $("switch").addEventListener("keydown", (event) => {
    if (event.key === "Escape") hideSwitch();
  });
  // A link followed while the page is open changes only the fragment: no reload.
  window.addEventListener("hashchange", () => {
    const offered = Session.offered();
    if (offered) offer(offered);
  });
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const held = $("login").dataset.mode === "tenant" ? Session.restore() : null;
    const token = held ? held.token : $("login-token").value.trim();
    if (!token) return;
    Session.store(token, $("login-tenant").value);
    $("login-token").value = "";
    open(Session.restore());
  });
  // Signing out on purpose: the next person may be another operator, for another tenant.
  const leave = () => {
    $("login-tenant").value = "";
    signOut("");
  };
  $("login-other").addEventListener("click", leave);
  $("signout").addEventListener("click", leave);
  $("chart-metric").addEventListener("change", (event) => dashboard && dashboard.setChartMetric(event.target.value));
  $("chart-range").addEventListener("change", (event) => dashboard && dashboard.setRange(Number(event.target.value)));
  $("device-filter").addEventListener("input", (event) => dashboard && dashboard.setFilter(event.target.value));
  const offered = Session.offered();
  const session = Session.restore();
  // The tab's own session is shown (behind the question, when a link offers another).
  if (session && !(offered && session.sameIdentity(offered))) open(session);
  else if (!offered) showLogin("");
  if (offered) offer(offered);
}

main();
