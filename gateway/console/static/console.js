// The gateway console: renders the snapshots of /console/events; no framework, no build step.
// Everything from the server goes into the page as text (textContent), never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const STALE_MS = 4000;
  let lastEventAt = 0;
  let windowMinutes = 5;
  let stepSeconds = 5;

  // -- formatting ------------------------------------------------------------------------------
  const pct = (x) => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(x >= 0.999 || x === 0 ? 0 : 1)}%`);
  const ms = (x) => (x === null || x === undefined ? "–" : x >= 1000 ? `${(x / 1000).toFixed(2)} s` : `${x.toFixed(x < 10 ? 1 : 0)} ms`);
  const num = (x) => (x === null || x === undefined ? "–" : `${Math.round(x * 10) / 10}`);
  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  function ago(t) {
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    return `${Math.floor(s / 3600)} h ago`;
  }
  function el(tag, attrs = {}, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- provider cards --------------------------------------------------------------------------
  const cards = new Map();

  function metric(dl, label, field) {
    const wrap = el("div", { class: "metric" });
    wrap.append(el("dt", {}, label));
    const dd = el("dd", { "data-field": field }, "–");
    wrap.append(dd);
    dl.append(wrap);
    return dd;
  }

  function card(p) {
    let c = cards.get(p.name);
    if (c) return c;
    const root = el("article", { class: "provider", "data-provider": p.name });
    const head = el("header");
    head.append(el("h2", {}, p.name));
    head.append(el("span", { class: "kind subtle" }, p.kind));
    const state = el("span", { class: "badge", "data-field": "breaker-state" }, "–");
    head.append(state);
    root.append(head);
    const since = el("div", { class: "since subtle", "data-field": "breaker-since" });
    root.append(since);
    const reason = el("div", { class: "reason", "data-field": "unusable-reason" });
    root.append(reason);
    const dl = el("dl", { class: "metrics" });
    const f = {
      approval: metric(dl, `approval rate`, "approval-rate"),
      payments: metric(dl, "payments", "payments"),
      p50: metric(dl, "latency p50", "latency-p50"),
      p99: metric(dl, "latency p99", "latency-p99"),
      failovers: metric(dl, "failovers / min", "failovers-per-min"),
      retries: metric(dl, "retries / min", "retries-per-min"),
      skipped: metric(dl, "routed around / min", "skipped-per-min"),
      bulkhead: metric(dl, "bulkhead in use", "bulkhead"),
      quota: metric(dl, "quota", "quota"),
      routerP99: metric(dl, "router p99 (demotion)", "router-p99"),
    };
    root.append(dl);
    const spark = el("div", { class: "spark", "data-field": "series", title: "approval rate (line) and volume (bars)" });
    root.append(spark);
    const caption = el("div", { class: "caption subtle" });
    root.append(caption);
    const actions = el("div", { class: "actions" });
    const open = el("button", { type: "button", class: "danger-outline", "data-action": "open" }, "Force open…");
    const close = el("button", { type: "button", "data-action": "closed" }, "Force closed…");
    open.addEventListener("click", () => breakerAction(p.name, "open"));
    close.addEventListener("click", () => breakerAction(p.name, "closed"));
    actions.append(open, close);
    root.append(actions);
    $("providers").append(root);
    c = { root, state, since, reason, f, spark, caption };
    cards.set(p.name, c);
    return c;
  }

  function sparkline(container, series) {
    const w = 240, h = 40, n = series.length;
    if (!n) return;
    const maxVol = Math.max(1, ...series.map((s) => s[0]));
    const svgNS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(svgNS, "svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.setAttribute("preserveAspectRatio", "none");
    const step = w / n;
    const base = document.createElementNS(svgNS, "line");
    base.setAttribute("x1", "0"); base.setAttribute("x2", `${w}`);
    base.setAttribute("y1", `${h - 0.5}`); base.setAttribute("y2", `${h - 0.5}`);
    base.setAttribute("class", "base");
    svg.append(base);
    series.forEach(([vol], i) => {
      if (!vol) return;
      const bh = Math.max(1, (vol / maxVol) * (h * 0.45));
      const r = document.createElementNS(svgNS, "rect");
      r.setAttribute("x", (i * step + 0.5).toFixed(1));
      r.setAttribute("y", (h - bh).toFixed(1));
      r.setAttribute("width", Math.max(1, step - 1).toFixed(1));
      r.setAttribute("height", bh.toFixed(1));
      r.setAttribute("class", "vol");
      svg.append(r);
    });
    let d = "";
    series.forEach(([vol, ok], i) => {
      if (!vol) return;
      const x = i * step + step / 2, y = 2 + (1 - ok / vol) * (h - 4);
      d += `${d ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
    });
    if (d) {
      const path = document.createElementNS(svgNS, "path");
      path.setAttribute("d", d);
      path.setAttribute("class", "rate");
      svg.append(path);
    }
    container.replaceChildren(svg);
  }

  function renderProvider(p) {
    const c = card(p);
    const s = p.stats;
    const state = p.breaker.state;
    c.root.dataset.breaker = state;
    c.root.classList.toggle("unusable", !p.usable);
    c.state.textContent = state;
    c.state.className = `badge breaker-${state}`;
    c.since.textContent = `breaker ${state} since ${clock(p.breaker.changed_at)} (${ago(p.breaker.changed_at)})`;
    c.reason.textContent = p.usable ? "" : `routed around: ${p.unusable_reason}`;
    c.f.approval.textContent = pct(s.approval_rate);
    c.f.approval.className = s.approval_rate === null ? "" : s.approval_rate >= 0.95 ? "good" : s.approval_rate >= 0.8 ? "warn" : "bad";
    c.f.payments.textContent = `${s.payments}`;
    c.f.payments.title = `${s.approved} approved, ${s.declined} declined, ${s.pending} pending, ${s.failed} failed`;
    c.f.p50.textContent = ms(s.latency_p50_ms);
    c.f.p99.textContent = ms(s.latency_p99_ms);
    c.f.failovers.textContent = num(s.failovers_per_min);
    c.f.failovers.className = s.failovers_per_min > 0 ? "warn" : "";
    c.f.retries.textContent = num(s.retries_per_min);
    c.f.skipped.textContent = num(s.skipped_per_min);
    const b = p.bulkhead;
    c.f.bulkhead.textContent = `${b.active} / ${b.max_concurrent}` + (b.waiting ? ` (+${b.waiting} queued)` : "");
    c.f.bulkhead.className = b.active >= b.max_concurrent ? "bad" : b.active >= 0.8 * b.max_concurrent ? "warn" : "";
    const q = p.quota;
    c.f.quota.textContent = q ? `${q.rate_limit_per_s}/s, ${q.mode}` + (q.has_token ? "" : " (at quota: spilling over)") : "none";
    c.f.quota.className = q && !q.has_token ? "warn" : "";
    c.f.routerP99.textContent = ms(p.router_p99_ms);
    sparkline(c.spark, s.series);
    c.caption.textContent = `approval (line) and volume (bars) per ${stepSeconds} s, last ${windowMinutes} min`;
  }

  // -- tables ----------------------------------------------------------------------------------
  function renderFailures(failures) {
    const body = $("failures").tBodies[0];
    body.replaceChildren(...failures.map((f) => {
      const tr = el("tr", { class: `outcome-${f.outcome}` });
      tr.append(el("td", {}, clock(f.at)), el("td", {}, f.provider ?? "–"), el("td", {}, f.outcome),
        el("td", { class: "code" }, `${f.operation === "authorize" ? "" : f.operation + ": "}${f.code ?? "–"}`),
        el("td", {}, f.http_status ?? "–"), el("td", { class: "code" }, f.payment_id),
        el("td", {}, f.payment_status), el("td", { class: "code" }, f.trace_id ?? "–"));
      return tr;
    }));
    $("failures-empty").hidden = failures.length > 0;
  }

  function renderCertificates(certs) {
    const body = $("certificates").tBodies[0];
    body.replaceChildren(...certs.map((c) => {
      const tr = el("tr", { class: `cert-${c.status}`, "data-status": c.status });
      const days = c.days_left === null ? "–" : c.days_left.toFixed(c.days_left < 10 ? 1 : 0);
      const status = el("td", {}, "");
      status.append(el("span", { class: `badge cert-badge-${c.status}` }, c.status));
      tr.append(el("td", {}, c.provider), el("td", {}, c.kind), el("td", { class: "code", title: c.error ?? c.location }, c.subject || c.location),
        el("td", { class: "num" }, days), status);
      return tr;
    }));
    $("certificates-empty").hidden = certs.length > 0;
  }

  function renderChanges(changes) {
    $("breaker-changes").replaceChildren(...changes.slice(0, 8).map((c) => {
      const li = el("li", {}, `${clock(c.at)}  ${c.provider}: ${c.from} → ${c.to}`);
      li.className = `to-${c.to}`;
      return li;
    }));
  }

  function render(snap) {
    windowMinutes = Math.round(snap.window_s / 60);
    stepSeconds = snap.series_step_s;
    const g = snap.gateway;
    $("g-approval").textContent = pct(g.approval_rate);
    $("g-approval").className = `value ${g.approval_rate === null ? "" : g.approval_rate >= 0.95 ? "good" : g.approval_rate >= 0.8 ? "warn" : "bad"}`;
    $("g-payments").textContent = `${g.payments} payments, last ${windowMinutes} min`;
    $("g-latency").textContent = `${ms(g.latency_p50_ms)} / ${ms(g.latency_p99_ms)}`;
    $("g-failovers").textContent = num(g.failovers_per_min);
    $("g-rate").textContent = `${num(g.payments_per_min)} payments / min`;
    $("g-pending").textContent = g.unresolved === null ? "?" : `${g.unresolved}${g.unresolved_capped ? "+" : ""}`;
    $("g-pending").className = `value ${g.unresolved ? "warn" : ""}`;
    $("g-inflight").textContent = `${g.in_flight} in flight`;
    $("g-budget").textContent = `${Math.floor(g.retry_budget_left)}`;
    $("g-budget").className = `value ${g.retry_budget_left < 1 ? "bad" : ""}`;
    snap.providers.forEach(renderProvider);
    renderFailures(snap.failures);
    renderCertificates(snap.certificates);
    renderChanges(snap.breaker_changes);
    const host = snap.host;
    const workers = host.workers > 1 ? ` · ${host.reporting} of ${host.workers} workers` : "";
    $("updated").textContent = `updated ${clock(snap.ts)}${workers}`;
  }

  // -- the stream ------------------------------------------------------------------------------
  function setConnection(state) {
    const c = $("connection");
    c.textContent = state;
    c.className = `badge conn-${state.replace(/\s+/g, "-")}`;
  }

  function connect() {
    const source = new EventSource("/console/events");
    source.addEventListener("hello", (e) => {
      const hello = JSON.parse(e.data);
      $("actor").textContent = `signed in as ${hello.actor}`;
    });
    source.addEventListener("snapshot", (e) => {
      lastEventAt = Date.now();
      setConnection("live");
      render(JSON.parse(e.data));
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        setConnection("signed out");  // the server refused the stream: the session ended
        window.setTimeout(() => window.location.reload(), 3000);
      } else {
        setConnection("reconnecting");
      }
    });
  }
  window.setInterval(() => {
    if (lastEventAt && Date.now() - lastEventAt > STALE_MS) setConnection("stale");
  }, 1000);

  // -- actions ---------------------------------------------------------------------------------
  function confirmAction(title, text) {
    const dialog = $("confirm");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "cancel";
      dialog.showModal();
      $("confirm-cancel").focus();
    });
  }

  function toast(text, bad) {
    const t = $("toast");
    t.textContent = text;
    t.className = `toast show ${bad ? "bad" : ""}`;
    window.clearTimeout(toast.timer);
    toast.timer = window.setTimeout(() => { t.className = "toast"; }, 5000);
  }

  async function post(path, body) {
    const response = await fetch(path, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const doc = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(doc.message || `HTTP ${response.status}`);
    return doc;
  }

  async function breakerAction(provider, state) {
    const text = state === "open"
      ? `Force the ${provider} breaker OPEN? New payments skip ${provider} and go to the backups. ` +
        `It stays open (no trial calls) until you force it closed.`
      : `Force the ${provider} breaker CLOSED? ${provider} takes traffic again at once.`;
    if (!(await confirmAction(`Force ${provider} ${state}`, text))) return;
    try {
      const doc = await post("/console/actions/breaker", { provider, state, confirm: true });
      toast(`${provider}: breaker ${doc.previous_state} → ${doc.state} (audit line written)`);
    } catch (err) {
      toast(`${provider}: ${err.message}`, true);
    }
  }

  $("reconcile").addEventListener("click", async () => {
    if (!(await confirmAction("Reconcile now", "Wake the reconciler now: every pending payment is settled by a status query at its provider."))) return;
    try {
      const doc = await post("/console/actions/reconcile", { confirm: true });
      toast(`reconciliation started: ${doc.unresolved ?? "?"} payment(s) awaiting it`);
    } catch (err) {
      toast(`reconcile: ${err.message}`, true);
    }
  });

  connect();
})();
