/* p2pimg dashboard, part 1 of 6: DOM and number helpers, the colours of sources, and the API
 * (plain fetch in a browser; Docker Desktop's extension client when window.ddClient exists, whose
 * `vm` service forwards requests to the p2pimg container over its socket).
 *
 * Plain JavaScript with no build step and no dependencies, so the page works offline and is
 * shipped as is in the Python package; six classic scripts share `window.p2pimg`. Every value
 * that comes from the API is put into the page with textContent or an attribute, never as HTML:
 * image names, peer addresses and error messages are data that other machines can choose.
 */
(() => {
  'use strict';

  const SVG_NS = 'http://www.w3.org/2000/svg';

  // ---------------------------------------------------------------------------------------------
  // Small helpers
  // ---------------------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function setAttrs(node, attrs) {
    if (!attrs) return;
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'text') node.textContent = String(value);
      else if (key === 'className') node.setAttribute('class', value);
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
  }

  function setText(node, text) {
    const value = String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function setAttr(node, name, value) {
    if (value === null || value === undefined) {
      if (node.hasAttribute(name)) node.removeAttribute(name);
      return;
    }
    const str = String(value);
    if (node.getAttribute(name) !== str) node.setAttribute(name, str);
  }

  const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

  function fmtBytes(n) {
    if (n === null || n === undefined || !isFinite(n)) return '–';
    let value = Math.max(0, n);
    let unit = 0;
    while (value >= 1024 && unit < UNITS.length - 1) {
      value /= 1024;
      unit += 1;
    }
    const digits = unit === 0 || value >= 100 ? 0 : value >= 10 ? 1 : 2;
    return `${value.toFixed(digits)} ${UNITS[unit]}`;
  }

  const fmtRate = (r) => (r === null || r === undefined ? '–' : `${fmtBytes(r)}/s`);

  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return '–';
    const s = Math.max(0, seconds);
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${Math.floor(s % 60)} s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ${m % 60} min`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }

  function fmtAgo(seconds) {
    if (!isFinite(seconds)) return '–';
    if (seconds < 2) return 'just now';
    return `${fmtDuration(seconds).replace(/ \d+ (s|min|h)$/, '')} ago`;
  }

  // The API's times are on the server's own clock (`now` in /ui/api/transfers), which need not
  // be the wall clock: place them by their distance from `now`.
  function fmtClock(at, now) {
    if (!isFinite(at) || !isFinite(now)) return '–';
    return new Date(Date.now() - (now - at) * 1000).toLocaleTimeString([], { hour12: false });
  }

  const pct = (part, whole) => (whole > 0 ? Math.min(100, (100 * part) / whole) : 0);

  function fmtPct(p) {
    if (p >= 99.95 || p === 0) return `${Math.round(p)} %`;
    return `${p.toFixed(p < 10 ? 1 : 0)} %`;
  }

  function shortMiddle(text, head, tail) {
    if (!text) return '';
    return text.length <= head + tail + 1 ? text : `${text.slice(0, head)}…${text.slice(-tail)}`;
  }

  const shortDigest = (d) => (d ? d.replace(/^sha256:/, '').slice(0, 12) : '');
  const shortId = (id) => (id ? shortMiddle(id, 10, 4) : '–');

  // ---------------------------------------------------------------------------------------------
  // Sources and their colours
  // ---------------------------------------------------------------------------------------------

  // One hue family per kind of source, a new shade for each new source of a kind; the colour a
  // source gets stays the same for the whole session, so a peer is the same green everywhere.
  const PALETTE = {
    origin: ['#2563eb', '#1d4ed8', '#3b82f6'],
    peer: ['#10b981', '#84cc16', '#0d9488', '#65a30d', '#34d399', '#15803d', '#a3e635', '#047857'],
    upstream: ['#f59e0b', '#ea580c', '#fb923c', '#d97706'],
    gateway: ['#a855f7', '#d946ef', '#7e22ce'],
    cache: ['#64748b'],
    other: ['#e11d48', '#0891b2', '#ca8a04'],
  };
  const KIND_LABEL = {
    origin: 'origin',
    peer: 'peer',
    upstream: 'upstream',
    gateway: 'gateway',
    cache: 'cache',
    other: '',
  };
  const assigned = new Map();
  const used = {};

  // A source's name starts with its kind: "origin file:///…", "peer http://10.0.0.2:5051",
  // "upstream https://…", "gateway http://…" (a colon after the kind is taken too).
  function sourceKind(source) {
    if (source === '*') return 'cache';
    const kind = /^([a-z]+)(?=[ :]|$)/.exec(String(source));
    return kind &&
      Object.prototype.hasOwnProperty.call(PALETTE, kind[1]) &&
      kind[1] !== 'other' &&
      kind[1] !== 'cache'
      ? kind[1]
      : 'other';
  }

  function sourceColor(source) {
    let color = assigned.get(source);
    if (color) return color;
    const kind = sourceKind(source);
    const shades = PALETTE[kind];
    used[kind] = (used[kind] || 0) + 1;
    color = shades[(used[kind] - 1) % shades.length];
    assigned.set(source, color);
    return color;
  }

  function sourceLabel(source) {
    if (source === '*') return 'already cached';
    const kind = sourceKind(source);
    // A node has one origin, so its URL (shown in the header) only makes the label long.
    if (kind === 'other' || kind === 'origin' || source === kind)
      return kind === 'origin' ? 'origin' : source;
    const where = source
      .slice(kind.length + 1)
      .trim()
      .replace(/^https?:\/\//, '');
    return where ? `${KIND_LABEL[kind]} ${where}` : KIND_LABEL[kind];
  }

  // Sources in a stable order: by kind (cache, origin, peers, upstreams, gateways), then name.
  const KIND_ORDER = ['cache', 'origin', 'peer', 'upstream', 'gateway', 'other'];
  function orderedSources(names) {
    return [...names].sort((a, b) => {
      const ka = KIND_ORDER.indexOf(sourceKind(a));
      const kb = KIND_ORDER.indexOf(sourceKind(b));
      return ka - kb || String(a).localeCompare(String(b));
    });
  }

  // A peer that never answered, or whose last inventory poll failed, is a warning: it may come
  // back, but nothing is fetched from it meanwhile.
  const STATE_CLASS = { ok: 'ok', backoff: 'warn', unreachable: 'warn', banned: 'bad' };

  /* Keep one DOM node per item, matched by key, so that a poll does not rebuild rows under the
   * pointer (a button being clicked, a row being focused) and nothing flickers. Children the
   * container had without a key (a table's <thead>) stay first, as they are. */
  function reconcile(container, items, keyOf, create, update) {
    const existing = new Map();
    let previous = null;
    for (const child of Array.from(container.children)) {
      if (child.dataset.key === undefined) previous = child;
      else existing.set(child.dataset.key, child);
    }
    for (const item of items) {
      const key = String(keyOf(item));
      let node = existing.get(key);
      if (node) existing.delete(key);
      else {
        node = create(item);
        node.dataset.key = key;
      }
      update(node, item);
      const expected = previous ? previous.nextElementSibling : container.firstElementChild;
      if (node !== expected) container.insertBefore(node, expected);
      previous = node;
    }
    for (const node of existing.values()) node.remove();
  }

  // ---------------------------------------------------------------------------------------------
  // The API, over fetch or Docker Desktop's extension client
  // ---------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function parseMaybe(text) {
    if (typeof text !== 'string') return text;
    try {
      return JSON.parse(text);
    } catch {
      return text;
    }
  }

  function errorFrom(status, body) {
    if (body && typeof body === 'object' && Array.isArray(body.errors) && body.errors.length) {
      const first = body.errors[0] || {};
      const message = body.errors.map((e) => (e && (e.message || e.code)) || 'error').join('; ');
      return new ApiError(status, first.code || `HTTP_${status}`, message);
    }
    const text = typeof body === 'string' && body.trim() ? body.trim().slice(0, 300) : `HTTP ${status}`;
    return new ApiError(status, `HTTP_${status}`, text);
  }

  const meta = (name) => {
    const node = document.querySelector(`meta[name="${name}"]`);
    return node ? node.getAttribute('content') || '' : '';
  };
  const PLACEHOLDER = /^\{\{[A-Z_]+\}\}$/;
  const ddService = (() => {
    const dd = window.ddClient;
    return dd && dd.extension && dd.extension.vm && dd.extension.vm.service ? dd.extension.vm.service : null;
  })();
  let token = meta('p2pimg-token');
  let readOnlyPage = meta('p2pimg-read-only') === '1';

  async function viaFetch(method, path, body) {
    const init = {
      method,
      headers: { Accept: 'application/json' },
      cache: 'no-store',
      credentials: 'same-origin',
    };
    if (method !== 'GET') {
      init.headers['Content-Type'] = 'application/json';
      init.headers['X-P2pimg-Token'] = token;
      init.body = JSON.stringify(body || {});
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, 'UNREACHABLE', `cannot reach p2pimg serve (${err.message})`);
    }
    const data = parseMaybe(await response.text());
    if (!response.ok) throw errorFrom(response.status, data);
    return data;
  }

  async function viaDockerDesktop(method, path, body) {
    const headers = { Accept: 'application/json' };
    const config = { url: path, method, headers };
    if (method !== 'GET') {
      headers['Content-Type'] = 'application/json';
      headers['X-P2pimg-Token'] = token;
      config.data = body || {};
    }
    try {
      return parseMaybe(await ddService.request(config));
    } catch (err) {
      // Docker Desktop rejects with a ServiceError {name, message, statusCode} for a non-2xx answer.
      const status = err && typeof err.statusCode === 'number' ? err.statusCode : 0;
      if (!status)
        throw new ApiError(
          0,
          'UNREACHABLE',
          `cannot reach the p2pimg backend (${(err && err.message) || err})`,
        );
      throw errorFrom(status, parseMaybe(err.message));
    }
  }

  const api = (method, path, body) => (ddService ? viaDockerDesktop : viaFetch)(method, path, body);

  // Docker Desktop loads this page from the extension image, not through `p2pimg serve`, so the
  // placeholders are still there. Its requests reach the backend over `serve --ui-socket`, which
  // asks for no token (only the socket's owner can open it); read-only comes from /ui/api/node.
  function settlePlaceholders() {
    if (PLACEHOLDER.test(token)) token = '';
    if (PLACEHOLDER.test(meta('p2pimg-read-only'))) readOnlyPage = false;
  }

  window.p2pimg = {
    $,
    el,
    svg,
    setText,
    setAttr,
    reconcile,
    fmtBytes,
    fmtRate,
    fmtDuration,
    fmtAgo,
    fmtClock,
    pct,
    fmtPct,
    shortMiddle,
    shortDigest,
    shortId,
    sourceKind,
    sourceColor,
    sourceLabel,
    orderedSources,
    STATE_CLASS,
    ApiError,
    api,
    settlePlaceholders,
    readOnlyPage: () => readOnlyPage,
  };
})();
