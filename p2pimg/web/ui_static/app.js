/* p2pimg dashboard, part 6 of 6: polls the JSON API under /ui/api/ once a second (one request per
 * endpoint, none while the tab is hidden), keeps the tables in step with it, and runs the actions
 * (warm, pin and unpin, cache gc), showing what the API refused in the error line.
 */
(() => {
  'use strict';

  const P = window.p2pimg;
  const {
    $,
    setText,
    setAttr,
    fmtBytes,
    fmtDuration,
    pct,
    fmtPct,
    shortId,
    api,
    settlePlaceholders,
    readOnlyPage,
    renderImages,
    renderCache,
    renderTransfers,
    renderPeers,
    renderSwarm,
  } = P;

  const POLL_MS = 1000;
  const ENDPOINTS = ['node', 'images', 'transfers', 'peers', 'cache'];

  // ---------------------------------------------------------------------------------------------
  // State, errors and the polling loop
  // ---------------------------------------------------------------------------------------------

  const state = {
    node: null,
    images: [],
    transfers: { now: Date.now() / 1000, active: [], finished: [], pulls: [] },
    peers: { peers: [], clients: [], me: '' },
    cache: null,
    selected: null, // {kind: 'pull' | 'blob', id} whose chart is shown; null = the latest pull
    expanded: new Set(), // ids of the pulls whose blobs are shown
    warm: null, // the warm job started from this page: {id, ref, ...its last status}
    pollError: null,
    actionError: null,
    lastOk: 0,
  };

  const isReadOnly = () => readOnlyPage() || Boolean(state.node && state.node.read_only);

  function showError() {
    const err = state.actionError || state.pollError;
    const box = $('error');
    if (!err) {
      box.hidden = true;
      setText($('error-text'), '');
      return;
    }
    const code = err.code && !/^HTTP_/.test(err.code) && err.code !== 'UNREACHABLE' ? `${err.code}: ` : '';
    const status = err.status ? ` (HTTP ${err.status})` : '';
    setText($('error-text'), `${err.what ? `${err.what} failed: ` : ''}${code}${err.message}${status}`);
    // A failed poll clears itself with the next good one; only an action's error is dismissed.
    $('error-dismiss').hidden = !state.actionError;
    box.hidden = false;
  }

  function actionFailed(what, err) {
    state.actionError = {
      what,
      status: err.status || 0,
      code: err.code || '',
      message: err.message || String(err),
    };
    showError();
  }

  function say(message) {
    setText($('status'), message);
  }

  let timer = null;
  let inFlight = false;
  let again = false;

  async function tick() {
    timer = null;
    if (document.hidden) return;
    inFlight = true;
    const results = await Promise.allSettled(ENDPOINTS.map((name) => api('GET', `/ui/api/${name}`)));
    let failure = null;
    results.forEach((result, i) => {
      if (result.status === 'rejected') {
        failure = failure || result.reason;
        return;
      }
      const data = result.value || {};
      switch (ENDPOINTS[i]) {
        case 'node':
          state.node = data;
          break;
        case 'images':
          state.images = Array.isArray(data.images) ? data.images : [];
          break;
        case 'transfers':
          state.transfers = {
            now: typeof data.now === 'number' ? data.now : Date.now() / 1000,
            active: Array.isArray(data.active) ? data.active : [],
            finished: Array.isArray(data.finished) ? data.finished : [],
            pulls: Array.isArray(data.pulls) ? data.pulls : [],
          };
          break;
        case 'peers':
          state.peers = {
            peers: Array.isArray(data.peers) ? data.peers : [],
            clients: Array.isArray(data.clients) ? data.clients : [],
            me: data.me || '',
          };
          break;
        case 'cache':
          state.cache = data;
          break;
        default:
          break;
      }
    });
    if (warmGoesOn(state.warm)) await pollWarm();
    state.pollError = failure
      ? { status: failure.status || 0, code: failure.code || '', message: failure.message || String(failure) }
      : null;
    if (!failure) state.lastOk = Date.now();
    render();
    inFlight = false;
    if (again) {
      again = false;
      tick();
    } else {
      schedule();
    }
  }

  function schedule() {
    if (document.hidden || inFlight || timer !== null) return;
    timer = setTimeout(tick, POLL_MS);
  }

  // After an action: show its effect now rather than at the next tick.
  function refreshNow() {
    if (inFlight) {
      again = true;
      return;
    }
    if (timer !== null) clearTimeout(timer);
    tick();
  }

  document.addEventListener('visibilitychange', () => {
    if (document.hidden) {
      if (timer !== null) clearTimeout(timer);
      timer = null;
      renderLive();
    } else {
      refreshNow();
    }
  });

  // ---------------------------------------------------------------------------------------------
  // Rendering
  // ---------------------------------------------------------------------------------------------

  function render() {
    renderLive();
    renderNode();
    renderImages();
    renderCache();
    renderTransfers();
    renderPeers();
    renderSwarm();
    renderActions();
    showError();
  }

  function renderLive() {
    const dot = $('live-dot');
    let text;
    let cls;
    if (document.hidden) {
      text = 'paused';
      cls = 'paused';
    } else if (state.pollError) {
      text = 'disconnected';
      cls = 'bad';
    } else if (state.lastOk) {
      text = `live · updated ${new Date(state.lastOk).toLocaleTimeString([], { hour12: false })}`;
      cls = 'ok';
    } else {
      text = 'connecting…';
      cls = '';
    }
    setText($('live-text'), text);
    setAttr(dot, 'class', `dot ${cls}`.trim());
  }

  function renderNode() {
    const node = state.node;
    if (!node) return;
    setText($('node-id'), shortId(node.node_id));
    setAttr($('node-id'), 'title', node.node_id || '');
    setText($('version'), node.version ? `v${node.version}` : '');
    setText($('registry'), node.registry || '–');
    setText($('origin'), node.origin || '–');
    setAttr($('origin'), 'title', node.origin || '');
    const ups = [...(node.upstreams || []), ...(node.gateways || []).map((g) => `gateway ${g}`)];
    setText($('upstreams'), ups.length ? ups.join(', ') : 'none');
    setAttr($('upstreams'), 'title', ups.join('\n'));
    setText($('peer-listen'), node.peer_listen || 'off');
    badge($('tls'), node.tls, 'peer TLS', 'TLS on: peers authenticate with the swarm CA', 'no peer TLS');
    badge($('swarm-key'), node.swarm_key, 'swarm key', 'a swarm key is set', 'no swarm key');
    $('mode').hidden = !isReadOnly();
    $('mode').className = 'badge warn';
    setText($('uptime'), fmtDuration(node.uptime));
  }

  function badge(node, on, label, onTitle, offLabel) {
    setText(node, on ? label : offLabel);
    setAttr(node, 'class', on ? 'badge on' : 'badge off');
    setAttr(node, 'title', on ? onTitle : offLabel);
    setAttr(node, 'data-state', on ? 'on' : 'off');
  }

  // ---- actions -------------------------------------------------------------------------------

  function renderActions() {
    const ro = isReadOnly();
    $('read-only-note').hidden = !ro;
    const running = Boolean(state.warm && state.warm.state === 'running');
    for (const id of ['warm-ref', 'warm-lan', 'warm-submit', 'gc-button']) $(id).disabled = ro;
    if (!ro) $('warm-submit').disabled = running;
    if (!ro && $('gc-button').dataset.busy === '1') $('gc-button').disabled = true;
    renderWarm();
  }

  function renderWarm() {
    const job = state.warm;
    const box = $('warm-job');
    if (!job) {
      box.hidden = true;
      return;
    }
    box.hidden = false;
    let p;
    if (job.state === 'done') p = 100;
    else if (job.bytes > 0) p = pct(job.bytes_done, job.bytes);
    else if (job.blobs > 0) p = pct(job.blobs_done, job.blobs);
    else p = 0;
    const fill = $('warm-fill');
    fill.style.width = `${p}%`;
    const finish = { done: ' done', failed: ' failed' }[job.state] || '';
    fill.className = `progress-fill${finish}`;
    const bar = $('warm-progress');
    setAttr(bar, 'aria-valuenow', Math.round(p));
    bar.dataset.state = job.state || 'starting';
    let text;
    const counts = job.blobs
      ? ` · ${job.blobs_done || 0}/${job.blobs} blobs` +
        ` · ${fmtBytes(job.bytes_done || 0)} of ${fmtBytes(job.bytes || 0)}`
      : '';
    if (job.state === 'done') text = `${job.ref}: done in ${fmtDuration(job.seconds)}${counts}`;
    else if (job.state === 'failed') text = `${job.ref}: failed${job.error ? `: ${job.error}` : ''}`;
    else text = `${job.ref}: ${job.state || 'starting'} ${fmtPct(p)}${counts}`;
    if (job.peers && typeof job.peers === 'object') {
      const states = {};
      for (const peer of Object.values(job.peers)) {
        const st = (peer && peer.state) || 'asked';
        states[st] = (states[st] || 0) + 1;
      }
      const total = Object.values(states).reduce((a, b) => a + b, 0);
      if (total)
        text += ` · peers: ${Object.entries(states)
          .map(([k, v]) => `${v} ${k}`)
          .join(', ')}`;
    }
    setText($('warm-state'), text);
  }

  // A LAN warm goes on after this node's part: its peers report until each of them is through.
  function warmGoesOn(job) {
    if (!job || !job.id) return Boolean(job && job.state === 'running');
    if (job.state === 'running') return true;
    const peers = job.peers && typeof job.peers === 'object' ? Object.values(job.peers) : [];
    return peers.some((peer) => !peer || !peer.state || peer.state === 'running');
  }

  async function pollWarm() {
    const job = state.warm;
    if (!job || !job.id) return;
    try {
      const status = await api('GET', `/ui/api/warm/${encodeURIComponent(job.id)}`);
      if (state.warm === job) state.warm = Object.assign({}, job, status, { ref: status.ref || job.ref });
      const now = state.warm.state;
      if (job.state === 'running' && now !== 'running') say(`Warm of ${state.warm.ref} ${now}.`);
    } catch (err) {
      if (state.warm === job) state.warm = Object.assign({}, job, { state: 'failed', error: err.message });
      actionFailed('Warm', err);
    }
  }

  async function startWarm(ref, lan) {
    ref = (ref || '').trim();
    if (!ref) return;
    $('warm-ref').value = ref;
    state.actionError = null;
    state.warm = { id: null, ref, state: 'running', blobs: 0, blobs_done: 0, bytes: 0, bytes_done: 0 };
    renderActions();
    renderImages();
    showError();
    try {
      const answer = await api('POST', '/ui/api/warm', { ref, lan: Boolean(lan) });
      state.warm = Object.assign({}, state.warm, { id: answer.id });
      say(`Warming ${ref}${lan ? ' across the LAN' : ''}…`);
    } catch (err) {
      state.warm = Object.assign({}, state.warm, { state: 'failed', error: err.message });
      actionFailed('Warm', err);
    }
    refreshNow();
  }

  async function togglePin(ref, pinned) {
    const buttons = Array.from(document.querySelectorAll('button[data-testid="pin-toggle"]')).filter(
      (b) => b.dataset.ref === ref,
    );
    for (const b of buttons) {
      b.dataset.busy = '1';
      b.disabled = true;
    }
    state.actionError = null;
    showError();
    try {
      const answer = await api('POST', pinned ? '/ui/api/unpin' : '/ui/api/pin', { ref });
      const blobs = answer && typeof answer.blobs === 'number' ? `${answer.blobs} blobs` : 'its blobs';
      say(
        pinned
          ? `Unpinned ${ref}: ${blobs} may be evicted again.`
          : `Pinned ${ref}: ${blobs} are never evicted.`,
      );
    } catch (err) {
      actionFailed(pinned ? 'Unpin' : 'Pin', err);
    }
    for (const b of buttons) delete b.dataset.busy;
    refreshNow();
  }

  async function runGc() {
    const button = $('gc-button');
    button.dataset.busy = '1';
    button.disabled = true;
    setText($('gc-result'), 'Running…');
    state.actionError = null;
    showError();
    try {
      const answer = await api('POST', '/ui/api/gc', {});
      setText(
        $('gc-result'),
        `Removed ${answer.removed} blob${answer.removed === 1 ? '' : 's'}, freed ${fmtBytes(answer.freed)}.`,
      );
    } catch (err) {
      setText($('gc-result'), '');
      actionFailed('Cache gc', err);
    }
    delete button.dataset.busy;
    button.disabled = isReadOnly();
    refreshNow();
  }

  // ---------------------------------------------------------------------------------------------
  // Start
  // ---------------------------------------------------------------------------------------------

  function wire() {
    $('warm-form').addEventListener('submit', (event) => {
      event.preventDefault();
      if (isReadOnly()) return;
      startWarm($('warm-ref').value, $('warm-lan').checked);
    });
    $('gc-button').addEventListener('click', runGc);
    $('chart-latest').addEventListener('click', () => P.selectTransfer(null));
    $('error-dismiss').addEventListener('click', () => {
      state.actionError = null;
      showError();
    });
  }

  // What the tables (tables.js) use of this file.
  Object.assign(P, { state, isReadOnly, togglePin, startWarm });

  function start() {
    wire();
    settlePlaceholders();
    renderActions();
    tick();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
