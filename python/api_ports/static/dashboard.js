// dynamic-port-manager dashboard: polls the router's JSON endpoints and draws
// the page. Plain JavaScript, no library. Every value from the server reaches
// the page as text (textContent, setAttribute), never as markup: a state
// file's path, a process name or a backup name may hold any character.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg"; // a namespace name, never fetched
  const body = document.body;
  const API = body.dataset.api || "";
  const POLL_MS = Math.max(1, Number(body.dataset.poll) || 3) * 1000;
  const OTHERS_SHOWN = 300; // rows of the "other programs" table
  const BARS = 12; // ports in the usage chart

  // ---- small helpers -------------------------------------------------------

  function $(id) {
    return document.getElementById(id);
  }

  // An element with attributes and children (strings become text nodes).
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function s(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    setAttrs(node, attrs);
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) {
        node.setAttribute(key, String(value));
      }
    }
  }

  function showIf(node, visible) {
    // `hidden` is an HTML attribute: an SVG element is hidden through its style.
    if (node instanceof HTMLElement) node.hidden = !visible;
    else node.style.display = visible ? "" : "none";
  }

  function isPort(value) {
    return Number.isInteger(value) && value >= 1 && value <= 65535;
  }

  function plural(n, word) {
    return n.toLocaleString("en") + " " + word + (n === 1 ? "" : "s");
  }

  function pad(n, width) {
    return String(n).padStart(width || 2, "0");
  }

  // ---- time ----------------------------------------------------------------

  // The state file's times are local Jalali wall-clock times of the server,
  // "YYYY/MM/DD HH:MM weekday". The browser's own ICU converts them back
  // (the Persian calendar of Intl), and the server's UTC offset is read off
  // last_checked beside last_checked_unix.
  const persian = (function () {
    try {
      const f = new Intl.DateTimeFormat("en-u-ca-persian-nu-latn", {
        timeZone: "UTC",
        year: "numeric",
        month: "numeric",
        day: "numeric",
      });
      return f.resolvedOptions().calendar === "persian" ? f : null;
    } catch (e) {
      return null;
    }
  })();
  const DAY_MS = 86400000;
  const jalaliCache = new Map();

  function persianDate(ms) {
    const parts = persian.formatToParts(new Date(ms));
    const get = (type) => Number((parts.find((p) => p.type === type) || {}).value);
    return [get("year"), get("month"), get("day")];
  }

  // The UTC midnight of Jalali date y/m/d, or null.
  function jalaliDayUTC(y, m, d) {
    const key = y + "/" + m + "/" + d;
    if (jalaliCache.has(key)) return jalaliCache.get(key);
    let found = null;
    if (persian) {
      // Farvardin 1 falls on March 20 or 21; months 1-6 have 31 days, then 30.
      const dayOfYear = (m <= 6 ? (m - 1) * 31 : 186 + (m - 7) * 30) + d - 1;
      const guess = Date.UTC(y + 621, 2, 21) + dayOfYear * DAY_MS;
      for (const delta of [0, -1, 1, -2, 2, -3, 3]) {
        const [py, pm, pd] = persianDate(guess + delta * DAY_MS);
        if (py === y && pm === m && pd === d) {
          found = guess + delta * DAY_MS;
          break;
        }
      }
    }
    jalaliCache.set(key, found);
    return found;
  }

  // "1403/05/01 12:10 doshanbe" -> its wall-clock time as if it were UTC (ms).
  function jalaliWall(text) {
    const m = /^(\d{3,4})\/(\d{1,2})\/(\d{1,2}) (\d{1,2}):(\d{2})/.exec(String(text || ""));
    if (!m) return null;
    const day = jalaliDayUTC(Number(m[1]), Number(m[2]), Number(m[3]));
    return day === null ? null : day + (Number(m[4]) * 60 + Number(m[5])) * 60000;
  }

  // The server's UTC offset in minutes, from last_checked and last_checked_unix.
  function serverOffset(state) {
    const wall = jalaliWall(state.last_checked);
    const unix = Number(state.last_checked_unix);
    if (wall === null || !Number.isFinite(unix)) return null;
    // last_checked is cut to the minute: round the difference to 15 minutes.
    return Math.round((wall - unix * 1000) / 900000) * 15;
  }

  function isoWall(wall, offset) {
    const d = new Date(wall);
    let text =
      d.getUTCFullYear() + "-" + pad(d.getUTCMonth() + 1) + "-" + pad(d.getUTCDate()) +
      "T" + pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes());
    if (offset !== null) {
      const sign = offset < 0 ? "-" : "+";
      const abs = Math.abs(offset);
      text += sign + pad(Math.floor(abs / 60)) + ":" + pad(abs % 60);
    }
    return text;
  }

  // A Jalali time as a <time>: the text as the state file has it, ISO on hover.
  function jalaliTime(text, offset) {
    const wall = jalaliWall(text);
    const node = h("time", {}, String(text));
    if (wall !== null) {
      const iso = isoWall(wall, offset);
      node.dateTime = iso;
      node.title = iso + (offset === null ? " (server's local time)" : "");
    }
    return node;
  }

  function localClock(date) {
    return pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds());
  }

  function ago(ms) {
    const sec = Math.max(0, Math.round(ms / 1000));
    if (sec < 60) return sec + " s ago";
    const min = Math.round(sec / 60);
    if (min < 60) return min + " min ago";
    const hours = Math.round(min / 60);
    if (hours < 48) return hours + " h ago";
    return Math.round(hours / 24) + " days ago";
  }

  // An ISO time (a lease's `since`) as a <time>: local clock and age, ISO on hover.
  function isoTime(text, now) {
    const ms = Date.parse(String(text));
    if (!Number.isFinite(ms)) return h("span", { class: "unknown" }, String(text || "unknown"));
    const d = new Date(ms);
    const sameDay = d.toDateString() === new Date(now).toDateString();
    const clock = sameDay
      ? localClock(d)
      : d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + localClock(d);
    return h("time", { datetime: String(text), title: String(text) }, clock + " · " + ago(now - ms));
  }

  // ---- the data --------------------------------------------------------------

  class HttpError extends Error {
    constructor(path, status, detail) {
      super(path + ": HTTP " + status + (detail ? " (" + detail + ")" : ""));
      this.status = status;
    }
  }

  // A request that hangs must not stop the polling: give up after a while.
  const REQUEST_MS = Math.max(10000, 3 * POLL_MS);

  async function getJSON(path) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), REQUEST_MS);
    try {
      const response = await fetch(API + path, {
        cache: "no-store",
        headers: { Accept: "application/json" },
        signal: abort.signal,
      });
      if (!response.ok) {
        let detail = null;
        try {
          const body = await response.json();
          if (body && typeof body.detail === "string") detail = body.detail;
        } catch (e) {
          // not JSON: the status says enough
        }
        throw new HttpError(path, response.status, detail);
      }
      return await response.json();
    } catch (e) {
      if (e && e.name === "AbortError") throw new Error(path + ": no answer in " + REQUEST_MS / 1000 + " s");
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  // Who holds each used port, from the owners endpoint ({"owners": [{port,
  // processes: [{pid, name}], unknown_uids, lease: {pid, state_file, since,
  // alive} | null}]}), where the server has it.
  // port -> {procs: [{pid, name}], lease: a state-like lease | null, hidden: [uid]}
  function ownersByPort(data) {
    const byPort = new Map();
    const entries = data && Array.isArray(data.owners) ? data.owners : [];
    for (const entry of entries) {
      if (!entry || typeof entry !== "object" || !isPort(entry.port)) continue;
      const procs = (Array.isArray(entry.processes) ? entry.processes : [])
        .filter((p) => p && Number.isInteger(p.pid))
        .map((p) => ({ pid: p.pid, name: p.name === null || p.name === undefined ? null : String(p.name) }));
      const l = entry.lease;
      const lease =
        l && typeof l === "object" && Number.isInteger(l.pid)
          ? {
              port: entry.port,
              pid: l.pid,
              // Shaped like a state's lease, whose owner is "<state file>#<holder>".
              owner: l.state_file !== undefined ? String(l.state_file) + "#" : String(l.owner ?? ""),
              since: l.since ?? null,
              alive: l.alive !== false,
            }
          : null;
      const hidden = Array.isArray(entry.unknown_uids) ? entry.unknown_uids.filter(Number.isInteger) : [];
      byPort.set(entry.port, { procs, lease, hidden });
    }
    return byPort;
  }

  // Free ports never handed out (browsers refuse them), if the state lists them.
  function skippedSet(state) {
    return Array.isArray(state.skipped_ports) ? new Set(state.skipped_ports.filter(isPort)) : null;
  }

  function stateFileOf(owner) {
    // A lease's owner is "<state file>#<holder>"; the path itself may hold "#".
    const text = String(owner ?? "");
    const cut = text.lastIndexOf("#");
    return cut > 0 ? text.slice(0, cut) : text;
  }

  // ---- drawing ---------------------------------------------------------------

  const STATES = ["free", "leased", "other", "skipped"];
  const STATE_WORDS = {
    free: "free",
    leased: "leased",
    other: "in use by another program",
    skipped: "skipped",
  };
  // What the grid shows now, for reading the port under the pointer.
  const view = { start: 0, end: -1, cols: 100, pitch: 10, x0: 44, y0: 14, base: 0, kinds: null, c: null };

  function classify(state, owners) {
    const [start, end] = (state.settings && state.settings.port_range) || [0, -1];
    const leases = (Array.isArray(state.leases) ? state.leases : []).filter(
      (l) => l && isPort(l.port) && l.port >= start && l.port <= end,
    );
    const leased = new Map(leases.map((l) => [l.port, l]));
    // The state lists the leases of its own file; the owners data (where the
    // server has it) also names leases taken through other state files.
    for (const [port, info] of owners) {
      if (info.lease && port >= start && port <= end && !leased.has(port)) {
        leases.push(info.lease);
        leased.set(port, info.lease);
      }
    }
    const used = new Set((state.used_ports || []).filter(isPort));
    const free = new Set((state.free_ports || []).filter(isPort));
    const skipped = skippedSet(state);
    const n = Math.max(0, end - start + 1);
    const kinds = new Uint8Array(n); // index into STATES
    const counts = { free: 0, leased: 0, other: 0, skipped: 0 };
    for (let port = start; port <= end; port++) {
      let kind;
      if (leased.has(port)) kind = 1;
      else if (used.has(port)) kind = 2;
      else if (free.has(port) && !(skipped && skipped.has(port))) kind = 0;
      // Listed as skipped, or in no list at all: a pick does not hand it out.
      else kind = 3;
      kinds[port - start] = kind;
      counts[STATES[kind]]++;
    }
    return { start, end, n, kinds, counts, leases, leased, owners, names: pidNames(owners) };
  }

  function procsOf(c, port) {
    const info = c.owners.get(port);
    return info ? info.procs : [];
  }

  function holderText(port, c) {
    const lease = c.leased.get(port);
    const procs = procsOf(c, port);
    const parts = [];
    if (lease) {
      const proc = procs.find((p) => p.pid === lease.pid);
      const name = (proc && proc.name) || c.names.get(lease.pid);
      parts.push("pid " + lease.pid + (name ? " " + name : ""));
    } else {
      for (const p of procs) parts.push((p.pid ? "pid " + p.pid : "") + (p.name ? " " + p.name : ""));
    }
    return parts.join(", ");
  }

  function drawGrid(c) {
    const grid = $("grid");
    const cols = c.n <= 10000 ? 100 : c.n <= 40000 ? 200 : 500;
    const pitch = cols === 100 ? 10 : cols === 200 ? 5 : 2;
    const cell = pitch === 2 ? 2 : pitch - 1;
    // Rows start at multiples of `cols`, so a port is its row's label plus its column.
    const base = Math.floor(c.start / cols) * cols;
    const rows = c.n ? Math.floor(c.end / cols) - Math.floor(c.start / cols) + 1 : 0;
    const x0 = 44;
    const y0 = 14;
    Object.assign(view, { start: c.start, end: c.end, cols, pitch, x0, y0, base, kinds: c.kinds, c });
    const width = x0 + cols * pitch;
    const height = y0 + rows * pitch + 2;
    grid.setAttribute("viewBox", "0 0 " + width + " " + height);
    grid.setAttribute("width", String(width));
    grid.setAttribute("height", String(height));
    const title = $("grid-title");
    title.textContent =
      "Ports " + c.start + " to " + c.end + ": " +
      STATES.map((k) => c.counts[k] + " " + STATE_WORDS[k]).join(", ");
    const inset = pitch > 2 ? 0.3 : 0;
    const freeCell = s("rect", {
      class: pitch > 2 ? "cell-free" : "cell-free-small",
      x: inset,
      y: inset,
      width: cell - 2 * inset,
      height: cell - 2 * inset,
    });
    const pattern = s(
      "pattern",
      { id: "pat-free-grid", patternUnits: "userSpaceOnUse", x: x0, y: y0, width: pitch, height: pitch },
      freeCell,
    );
    const nodes = [title, s("defs", {}, pattern)];
    // Column ticks every tenth column.
    const step = cols / 10;
    for (let col = 0; col < cols; col += step) {
      nodes.push(s("text", { x: x0 + col * pitch, y: y0 - 4, class: "tick" }, "+" + col));
    }
    const labelEvery = rows <= 80 ? (cols === 100 ? 2 : 4) : Math.ceil(rows / 40);
    for (let r = 0; r < rows; r++) {
      const rowStart = base + r * cols;
      const y = y0 + r * pitch;
      if (r % labelEvery === 0 || r === rows - 1) {
        nodes.push(s("text", { x: x0 - 4, y: y + cell, "text-anchor": "end", class: "tick" }, String(rowStart)));
      }
      // The row's ports in the range as one run of free cells (the pattern
      // draws each cell's box), then every cell that is not free on top.
      const first = Math.max(rowStart, c.start);
      const last = Math.min(rowStart + cols - 1, c.end);
      nodes.push(
        s("rect", {
          class: "run",
          fill: "url(#pat-free-grid)",
          x: x0 + (first - rowStart) * pitch,
          y,
          width: (last - first) * pitch + cell,
          height: cell,
        }),
      );
    }
    const edge = pitch > 2 ? 0.5 : 0;
    for (let i = 0; i < c.n; i++) {
      const kind = c.kinds[i];
      if (kind === 0) continue;
      const port = c.start + i;
      const name = STATES[kind];
      const col = (port - base) % cols;
      const row = Math.floor((port - base) / cols);
      const who = holderText(port, c);
      nodes.push(
        s(
          "rect",
          {
            class: "cell cell-" + name,
            fill: "url(#pat-" + name + ")",
            // Inset by half the outline, so neighbours' outlines keep the gap.
            x: x0 + col * pitch + edge,
            y: y0 + row * pitch + edge,
            width: cell - 2 * edge,
            height: cell - 2 * edge,
            "data-port": port,
            "data-state": name,
          },
          s("title", {}, port + ": " + STATE_WORDS[name] + (who ? " (" + who + ")" : "")),
        ),
      );
    }
    grid.replaceChildren(...nodes);
  }

  function portAt(event) {
    const grid = $("grid");
    const ctm = grid.getScreenCTM();
    if (!ctm || !view.kinds) return null;
    const pt = new DOMPoint(event.clientX, event.clientY).matrixTransform(ctm.inverse());
    const col = Math.floor((pt.x - view.x0) / view.pitch);
    const row = Math.floor((pt.y - view.y0) / view.pitch);
    if (col < 0 || col >= view.cols || row < 0) return null;
    const port = view.base + row * view.cols + col;
    return port >= view.start && port <= view.end ? port : null;
  }

  function describePort(port) {
    const name = STATES[view.kinds[port - view.start]];
    const who = holderText(port, view.c);
    return "Port " + port + ": " + STATE_WORDS[name] + (who ? " (" + who + ")" : "");
  }

  function drawCounts(c) {
    for (const k of STATES) $("count-" + k).textContent = c.counts[k].toLocaleString("en");
    $("count-total").textContent = c.n.toLocaleString("en");
  }

  // The holder's name: the owners entry of that pid, else a nameless-pid one.
  // Names of every pid the owners data shows holding a socket anywhere: a
  // lease's holder is named even when the leased port itself is not bound.
  function pidNames(owners) {
    const names = new Map();
    for (const info of owners.values()) {
      for (const p of info.procs) if (p.pid !== null && p.name) names.set(p.pid, p.name);
    }
    return names;
  }

  function processCell(c, lease) {
    const procs = procsOf(c, lease.port);
    const proc = procs.find((p) => p.pid === lease.pid);
    const name = (proc && proc.name) || c.names.get(lease.pid);
    if (lease.alive === false) {
      return h("td", { class: "unknown" }, (name ? name + ": " : "") + "exited (the next pick reclaims it)");
    }
    if (name) return h("td", {}, name);
    return h("td", { class: "unknown" }, "unknown");
  }

  function drawLeases(state, c, now) {
    const rows = [...c.leases]
      .sort((a, b) => a.port - b.port)
      .map((lease) => {
        const portCell = h("td", { class: "num" }, String(lease.port));
        if (lease.port === state.current_port) {
          portCell.append(h("span", { class: "tag", title: "this server's manager's active port" }, "active"));
        }
        return h(
          "tr",
          { "data-port": lease.port, "data-pid": lease.pid },
          portCell,
          h("td", { class: "num pid" }, String(lease.pid)),
          processCell(c, lease),
          h("td", { class: "path" }, stateFileOf(lease.owner)),
          h("td", {}, isoTime(lease.since, now)),
        );
      });
    $("leases").tBodies[0].replaceChildren(...rows);
    $("leases-count").textContent = "(" + rows.length + ")";
    showIf($("leases-empty"), rows.length === 0);
    showIf($("leases").parentElement, rows.length > 0);
  }

  function drawOthers(c, ownersKnown) {
    const rows = [];
    let total = 0;
    for (let i = 0; i < c.n; i++) {
      if (c.kinds[i] !== 2) continue;
      total++;
      if (rows.length >= OTHERS_SHOWN) continue;
      const port = c.start + i;
      const procs = procsOf(c, port);
      const info = c.owners.get(port);
      const pids = procs.map((p) => p.pid).filter((p) => p !== null);
      const names = procs.map((p) => p.name).filter(Boolean);
      // Sockets of another user's processes: the server may not look into them.
      const hidden = info && info.hidden.length ? "a process of uid " + info.hidden.join(", ") + " (not visible)" : null;
      rows.push(
        h(
          "tr",
          { "data-port": port },
          h("td", { class: "num" }, String(port)),
          pids.length ? h("td", { class: "num" }, pids.join(", ")) : h("td", { class: "unknown" }, "unknown"),
          names.length ? h("td", {}, names.join(", ")) : h("td", { class: "unknown" }, hidden || "unknown"),
        ),
      );
    }
    $("others").tBodies[0].replaceChildren(...rows);
    $("other-count").textContent = "(" + total + ")";
    showIf($("others-empty"), total === 0);
    showIf($("others").parentElement, total > 0);
    const notes = [];
    if (total > rows.length) notes.push("The first " + rows.length + " of " + total + " are shown.");
    if (total && !ownersKnown) notes.push("Process names need the server's owners endpoint, which it does not have.");
    $("others-note").textContent = notes.join(" ");
    showIf($("others-note"), notes.length > 0);
  }

  function drawUsage(state) {
    const usage = Object.entries(state.port_usage || {})
      .map(([port, count]) => [Number(port), Number(count)])
      .filter(([port, count]) => isPort(port) && Number.isFinite(count) && count > 0)
      .sort((a, b) => b[1] - a[1] || a[0] - b[0])
      .slice(0, BARS);
    const svg = $("usage");
    const title = $("usage-title");
    showIf($("usage-empty"), usage.length === 0);
    showIf(svg, usage.length > 0);
    const width = 460;
    const row = 20;
    const labelW = 52;
    const countW = 48;
    const max = usage.length ? usage[0][1] : 1;
    const nodes = [title];
    title.textContent =
      "Picks per port, most used first: " + usage.map(([p, n]) => p + " " + plural(n, "pick")).join(", ");
    usage.forEach(([port, count], i) => {
      const y = i * row;
      const barW = Math.max(2, ((width - labelW - countW) * count) / max);
      nodes.push(
        s("text", { x: labelW - 6, y: y + 14, "text-anchor": "end" }, String(port)),
        s("rect", { class: "bar-track", x: labelW, y: y + 3, width: width - labelW - countW, height: row - 6 }),
        s(
          "rect",
          { class: "bar", x: labelW, y: y + 3, width: barW, height: row - 6, "data-port": port },
          s("title", {}, port + ": " + plural(count, "pick")),
        ),
        s("text", { x: labelW + barW + 6, y: y + 14, class: "label-muted" }, String(count)),
      );
    });
    svg.setAttribute("viewBox", "0 0 " + width + " " + Math.max(row, usage.length * row));
    svg.replaceChildren(...nodes);
  }

  function historyKind(entry) {
    if (entry.new === null || entry.new === undefined) return "release";
    return entry.prev === null || entry.prev === undefined ? "pick" : "move";
  }

  function drawHistory(state) {
    const history = (Array.isArray(state.history) ? state.history : []).filter((e) => e && typeof e === "object");
    const offset = serverOffset(state);
    $("history-count").textContent = "(" + history.length + ")";
    showIf($("history-empty"), history.length === 0);
    const items = history
      .map((entry) => {
        const kind = historyKind(entry);
        const what =
          kind === "release"
            ? ["released", String(entry.prev ?? "")]
            : kind === "pick"
              ? ["picked", String(entry.new)]
              : ["moved", entry.prev + " → " + entry.new];
        return h(
          "li",
          { class: kind, "data-new": entry.new ?? "", "data-prev": entry.prev ?? "" },
          jalaliTime(entry.time, offset),
          h("span", { class: "kind" }, what[0]),
          h("span", { class: "mono" }, what[1]),
        );
      })
      .reverse();
    $("history").replaceChildren(...items);
    drawTimeline(history);
  }

  // Events along a time axis: where the changes bunch up, and when.
  function drawTimeline(history) {
    const svg = $("timeline");
    const title = $("timeline-title");
    showIf(svg, history.length > 0);
    if (!history.length) return;
    const walls = history.map((e) => jalaliWall(e.time));
    const known = walls.filter((w) => w !== null);
    const width = 460;
    const left = 8;
    const right = width - 8;
    const axisY = 30;
    let lo = Math.min(...known);
    let hi = Math.max(...known);
    if (!known.length) {
      lo = 0;
      hi = history.length - 1;
    }
    if (hi === lo) {
      lo -= 60000;
      hi += 60000;
    }
    const nodes = [title];
    nodes.push(s("line", { class: "axis", x1: left, x2: right, y1: axisY, y2: axisY }));
    // Events of the same minute stack upwards.
    const stack = new Map();
    history.forEach((entry, i) => {
      const t = known.length ? walls[i] : i;
      if (t === null) return;
      const x = left + ((t - lo) / (hi - lo)) * (right - left);
      const level = stack.get(t) || 0;
      stack.set(t, level + 1);
      const y = axisY - 6 - Math.min(level, 4) * 5;
      const kind = historyKind(entry);
      const label = String(entry.time) + ": " + (kind === "release" ? "released " + entry.prev : kind + " " + entry.new);
      const mark =
        kind === "move"
          ? s("rect", { class: "mark-move", x: x - 2.5, y: y - 2.5, width: 5, height: 5, transform: "rotate(45 " + x + " " + y + ")" })
          : s("circle", { class: "mark-" + kind, cx: x, cy: y, r: 2.6 });
      mark.append(s("title", {}, label));
      nodes.push(mark);
    });
    // A stack taller than the marks drawn says how many it holds.
    for (const [t, count] of stack) {
      if (count <= 5) continue;
      const x = left + ((t - lo) / (hi - lo)) * (right - left);
      nodes.push(s("text", { x: x + 5, y: axisY - 22, class: "label-muted" }, "×" + count));
    }
    const firstText = history[0].time;
    const lastText = history[history.length - 1].time;
    nodes.push(s("text", { x: left, y: axisY + 14, class: "label-muted" }, String(firstText)));
    nodes.push(s("text", { x: right, y: axisY + 14, "text-anchor": "end", class: "label-muted" }, String(lastText)));
    title.textContent = history.length + " changes from " + firstText + " to " + lastText;
    svg.setAttribute("viewBox", "0 0 " + width + " " + (axisY + 20));
    svg.replaceChildren(...nodes);
  }

  function backupTime(name) {
    const m = /_(\d{4})(\d{2})(\d{2})_(\d{2})(\d{2})(\d{2})/.exec(name);
    return m ? m[1] + "-" + m[2] + "-" + m[3] + " " + m[4] + ":" + m[5] + ":" + m[6] : null;
  }

  function drawBackups(data) {
    if (!data) return; // keep the last list when this poll's request failed
    const names = (Array.isArray(data.backups) ? data.backups : []).map(String).reverse();
    const items = names.map((name) => {
      const link = h("a", { href: API + "backup/download?" + new URLSearchParams({ filename: name }), download: name }, name);
      const when = backupTime(name);
      return h("li", {}, link, when ? h("span", { class: "when" }, when) : null);
    });
    $("backups").replaceChildren(...items);
    $("backups-count").textContent = "(" + names.length + ", newest first)";
    showIf($("backups-empty"), names.length === 0);
  }

  // Every named service's live instances ({"instances": [{service, host, port,
  // pid, state_file, since}]}): this host's registry, or etcd with discovery.
  function drawServices(data) {
    if (!data) return; // keep the last list when this poll's request failed
    const list = Array.isArray(data.instances) ? data.instances : [];
    const rows = list.map((i) =>
      h(
        "tr",
        { title: String(i.state_file ?? "") },
        h("td", {}, String(i.service)),
        h("td", {}, String(i.host) + ":" + String(i.port)),
        h("td", {}, String(i.pid)),
      ),
    );
    $("services").tBodies[0].replaceChildren(...rows);
    $("services-count").textContent = "(" + list.length + ")";
    showIf($("services-empty"), list.length === 0);
  }

  function drawError(state) {
    // `error_active` says whether the error still holds; without it, the
    // recorded error is shown for as long as the state keeps it.
    const active = typeof state.error_active === "boolean" ? state.error_active : state.last_error != null;
    showIf($("error-banner"), active && state.last_error != null);
    $("error-text").textContent = String(state.last_error ?? "");
    $("error-time").replaceChildren();
    if (state.last_error_time != null) {
      $("error-time").append("since ", jalaliTime(state.last_error_time, serverOffset(state)));
    }
  }

  function drawEphemeral(state) {
    const o = state.ephemeral_overlap;
    const known = o && typeof o === "object" && isPort(o.first) && isPort(o.last);
    showIf($("ephemeral-note"), Boolean(known));
    if (!known) return;
    const kernel = Array.isArray(o.ephemeral_range) ? " " + o.ephemeral_range.join("–") : "";
    $("ephemeral-note").textContent =
      "Ports " + o.first + "–" + o.last + (Number.isInteger(o.count) ? " (" + plural(o.count, "port") + ")" : "") +
      " of this range lie in the kernel's ephemeral range" + kernel +
      ": any outgoing connection may take one of them without asking.";
  }

  function drawHeader(state, c) {
    $("range-label").textContent = c.start + "–" + c.end;
    $("state-file").textContent = String((state.settings && state.settings.json_path) ?? "");
    document.title = "Ports " + c.start + "–" + c.end + " · " + c.counts.leased + " leased";
  }

  // ---- polling ---------------------------------------------------------------

  let ownersAvailable = true; // until the endpoint answers 404
  let updates = 0;
  let lastSuccess = null;

  async function poll() {
    body.classList.add("polling");
    try {
      const [state, backups, owners, services] = await Promise.all([
        getJSON("state"),
        getJSON("backup/list").catch(() => null),
        ownersAvailable
          ? getJSON("owners").catch((e) => {
              if (e instanceof HttpError && (e.status === 404 || e.status === 405)) ownersAvailable = false;
              return null;
            })
          : null,
        getJSON("services").catch(() => null),
      ]);
      const now = Date.now();
      const c = classify(state, ownersByPort(owners));
      drawHeader(state, c);
      drawError(state);
      drawEphemeral(state);
      drawCounts(c);
      drawGrid(c);
      if (hovered !== null) describeHovered();
      drawLeases(state, c, now);
      drawOthers(c, ownersAvailable);
      showIf($("leases-note"), !ownersAvailable);
      drawUsage(state);
      drawHistory(state);
      drawBackups(backups);
      drawServices(services);
      updates++;
      lastSuccess = new Date(now);
      body.dataset.updates = String(updates);
      body.classList.remove("stale");
      $("conn-banner").hidden = true;
      const updated = $("updated");
      updated.replaceChildren(
        "Updated ",
        h("time", { datetime: lastSuccess.toISOString(), title: lastSuccess.toISOString() }, localClock(lastSuccess)),
        state.last_checked ? " · last refresh " : "",
        state.last_checked ? jalaliTime(state.last_checked, serverOffset(state)) : "",
      );
    } catch (e) {
      body.classList.add("stale");
      $("conn-banner").hidden = false;
      $("conn-text").textContent =
        String(e && e.message ? e.message : e) +
        (lastSuccess ? ". Showing the data of " + localClock(lastSuccess) : "") +
        "; trying again every " + POLL_MS / 1000 + " s.";
      if (!lastSuccess) $("updated").textContent = "No data yet";
    } finally {
      body.classList.remove("polling");
      setTimeout(poll, POLL_MS);
    }
  }

  let hovered = null; // the port under the pointer, described again after each poll

  function describeHovered() {
    const caption = $("grid-hover");
    const known = hovered !== null && view.kinds && hovered >= view.start && hovered <= view.end;
    caption.textContent = known ? describePort(hovered) : "Point at a cell to read its port.";
  }

  function hover(event) {
    hovered = portAt(event);
    describeHovered();
  }

  $("grid").addEventListener("mousemove", hover);
  $("grid").addEventListener("mouseleave", () => {
    hovered = null;
    describeHovered();
  });
  poll();
})();
