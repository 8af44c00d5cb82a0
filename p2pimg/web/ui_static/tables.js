/* p2pimg dashboard, part 3 of 4: the tables (images, cache, transfers, peers), each kept in step
 * with the last poll. The state and the actions are app.js's, reached through window.p2pimg when
 * a table is drawn or a button pressed (app.js loads after this file).
 */
(() => {
  'use strict';

  const P = window.p2pimg;
  const {
    $,
    el,
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
    STATE_CLASS,
    renderStack,
    renderLegend,
    chunkMap,
    updateChunkMap,
    drawChart,
    drawSwarm,
  } = P;

  // ---- images --------------------------------------------------------------------------------

  const refOf = (image) => `${image.name}:${image.tag}`;

  function renderImages() {
    const body = $('image-rows');
    const ro = P.isReadOnly();
    reconcile(
      body,
      P.state.images,
      (img) => `${img.kind}|${refOf(img)}|${img.root}`,
      () => {
        const pin = el('button', { type: 'button', className: 'small', 'data-testid': 'pin-toggle' });
        const warm = el('button', {
          type: 'button',
          className: 'small',
          'data-testid': 'warm-row',
          text: 'Warm',
        });
        pin.addEventListener('click', () => P.togglePin(pin.dataset.ref, pin.dataset.pinned === '1'));
        warm.addEventListener('click', () => P.startWarm(warm.dataset.ref, $('warm-lan').checked));
        return el(
          'tr',
          { 'data-testid': 'image-row' },
          el(
            'td',
            null,
            el('span', { className: 'name', 'data-testid': 'image-name' }),
            el('span', { className: 'badge kind' }),
          ),
          el('td', { 'data-testid': 'image-tag' }),
          el('td', null, el('code', { 'data-testid': 'image-root' })),
          el('td', { className: 'num', 'data-testid': 'image-size' }),
          el(
            'td',
            null,
            el(
              'div',
              { className: 'cached', 'data-testid': 'image-cached' },
              el(
                'div',
                { className: 'bar', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100 },
                el('div', { className: 'bar-fill' }),
              ),
              el('span', { className: 'pct' }),
            ),
          ),
          el('td', { 'data-testid': 'image-pinned' }),
          el('td', { className: 'buttons' }, pin, warm),
        );
      },
      (row, img) => {
        const ref = refOf(img);
        const cells = row.children;
        row.dataset.ref = ref;
        row.dataset.root = img.root || '';
        const shown = img.name.startsWith('ipfs/')
          ? `ipfs/${shortMiddle(img.name.slice(5), 10, 6)}`
          : img.name;
        setText(cells[0].firstChild, shown);
        setAttr(cells[0].firstChild, 'title', img.name);
        setText(cells[0].lastChild, img.kind || '');
        setText(cells[1], img.tag);
        setText(cells[2].firstChild, img.root ? shortMiddle(img.root, 10, 6) : 'unresolved');
        setAttr(cells[2].firstChild, 'title', img.root || img.error || null);
        setAttr(cells[2].firstChild, 'class', img.root ? null : 'bad');
        setText(cells[3], fmtBytes(img.size));
        const p = pct(img.cached, img.size);
        const bar = cells[4].querySelector('.bar');
        const fill = bar.firstChild;
        fill.style.width = `${p}%`;
        fill.classList.toggle('full', p >= 100);
        setAttr(bar, 'aria-valuenow', Math.round(p));
        setAttr(bar, 'aria-label', `${ref}: ${fmtBytes(img.cached)} of ${fmtBytes(img.size)} cached`);
        setAttr(bar, 'title', `${fmtBytes(img.cached)} of ${fmtBytes(img.size)} cached`);
        setText(cells[4].querySelector('.pct'), fmtPct(p));
        cells[4].firstChild.dataset.cached = String(img.cached);
        setText(cells[5], img.pinned ? 'pinned' : '–');
        setAttr(cells[5], 'class', img.pinned ? 'state ok' : 'muted');
        row.dataset.pinned = img.pinned ? '1' : '0';
        const [pin, warm] = cells[6].children;
        pin.dataset.ref = ref;
        pin.dataset.pinned = img.pinned ? '1' : '0';
        setText(pin, img.pinned ? 'Unpin' : 'Pin');
        setAttr(pin, 'aria-label', `${img.pinned ? 'Unpin' : 'Pin'} ${ref}`);
        warm.dataset.ref = ref;
        setAttr(warm, 'aria-label', `Warm ${ref}`);
        pin.disabled = ro || pin.dataset.busy === '1';
        warm.disabled = ro || Boolean(P.state.warm && P.state.warm.state === 'running');
      },
    );
    $('images-empty').hidden = P.state.images.length > 0;
  }

  // ---- cache ---------------------------------------------------------------------------------

  function renderCache() {
    const c = P.state.cache;
    if (!c) return;
    const limit = typeof c.limit === 'number' && c.limit > 0 ? c.limit : null;
    const whole = limit || Math.max(c.used, 1);
    const usedPct = pct(c.used, whole);
    const fill = $('cache-fill');
    fill.style.width = `${usedPct}%`;
    fill.classList.toggle('high', limit !== null && usedPct >= 90);
    $('cache-pinned-fill').style.width = `${pct(Math.min(c.pinned, c.used), whole)}%`;
    setAttr($('cache-meter'), 'aria-valuenow', Math.round(usedPct));
    setAttr(
      $('cache-meter'),
      'aria-valuetext',
      limit ? `${fmtBytes(c.used)} of ${fmtBytes(limit)}` : `${fmtBytes(c.used)}, no limit`,
    );
    setText($('cache-used'), fmtBytes(c.used));
    setText(
      $('cache-limit'),
      limit ? `of ${fmtBytes(limit)} (${fmtPct(usedPct)})` : 'used · no limit (--cache-max)',
    );
    setText($('cache-blobs'), String(c.blobs));
    setText($('cache-partial'), fmtBytes(c.partial));
    setText($('cache-pinned'), fmtBytes(c.pinned));
    setText($('cache-evictions'), c.evictions ? `${c.evictions} (${fmtBytes(c.evicted_bytes)})` : '0');
    setText(
      $('gc-hint'),
      limit
        ? `Evicts least recently used unpinned blobs until the cache fits in ${fmtBytes(limit)} ` +
            '(--cache-max); an evicted blob is fetched again on its next use.'
        : 'No --cache-max is set, so gc evicts every unpinned blob (each is fetched again on its next use).',
    );
  }

  // ---- transfers -----------------------------------------------------------------------------

  function transferTitle(t) {
    return `${t.repository ? `${t.repository} · ` : ''}${shortDigest(t.digest)}`;
  }

  function selectedTransfer() {
    const all = [...P.state.transfers.active, ...P.state.transfers.finished];
    if (P.state.selected) {
      const found = all.find((t) => t.id === P.state.selected);
      if (found) return found;
    }
    // The latest: the most recently started of those running, else the one that ended last.
    let latest = null;
    for (const t of P.state.transfers.active) if (!latest || t.started > latest.started) latest = t;
    for (const t of latest ? [] : P.state.transfers.finished)
      if (!latest || (t.ended || 0) > (latest.ended || 0)) latest = t;
    return latest;
  }

  function select(id) {
    P.state.selected = id;
    renderTransfers();
  }

  function selectable(node, getId) {
    node.tabIndex = 0;
    node.addEventListener('click', (event) => {
      if (event.target.closest('button, a')) return;
      select(getId());
    });
    node.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        select(getId());
      }
    });
  }

  function renderTransfers() {
    const { active, finished, now } = P.state.transfers;
    const chosen = selectedTransfer();
    const chosenId = chosen ? chosen.id : null;

    reconcile(
      $('active-transfers'),
      active,
      (t) => t.id,
      (t) => {
        const item = el(
          'li',
          { className: 'transfer', 'data-testid': 'transfer-active' },
          el(
            'div',
            { className: 'transfer-head' },
            el('span', { className: 'what mono' }),
            el('span', { className: 'meta progress-text' }),
            el('span', { className: 'meta rate' }),
            el('span', { className: 'meta failures' }),
          ),
          chunkMap(),
          el('p', { className: 'chunk-note' }),
          el('ul', { className: 'legend' }),
        );
        selectable(item, () => item.dataset.key);
        setAttr(item, 'aria-label', `Transfer ${t.digest}`);
        return item;
      },
      (item, t) => {
        item.dataset.id = t.id;
        item.dataset.digest = t.digest;
        item.dataset.have = String(t.have);
        item.dataset.chunks = String(t.chunks);
        setAttr(item, 'aria-current', t.id === chosenId ? 'true' : null);
        const [what, progress, rate, failures] = item.firstChild.children;
        setText(what, transferTitle(t));
        setAttr(what, 'title', t.digest);
        const done = bytesDone(t);
        setText(
          progress,
          `${fmtBytes(done)} of ${fmtBytes(t.size)} · ${t.have}/${t.chunks} chunks · ${fmtDuration(now - t.started)}`,
        );
        setText(rate, fmtRate(t.rate));
        setText(
          failures,
          t.failures ? `${t.failures} verification failure${t.failures === 1 ? '' : 's'}` : 'no failures',
        );
        setAttr(failures, 'class', t.failures ? 'meta failures bad' : 'meta failures');
        const group = updateChunkMap(item.children[1], t);
        const note = item.children[2];
        setText(
          note,
          group > 1
            ? `one cell = ${group} chunks of ${fmtBytes(t.chunk_size)}`
            : `one cell = one chunk of ${fmtBytes(t.chunk_size)}`,
        );
        renderLegend(item.children[3], t, true);
      },
    );
    $('active-empty').hidden = active.length > 0;

    reconcile(
      $('finished-rows'),
      finished,
      (t) => t.id,
      () => {
        const row = el(
          'tr',
          { className: 'selectable', 'data-testid': 'transfer-finished' },
          el('td', { className: 'when' }),
          el('td', null, el('span', { className: 'mono' })),
          el('td', { className: 'num' }),
          el('td', { className: 'num' }),
          el(
            'td',
            null,
            el('div', { className: 'stack', 'data-testid': 'bytes-by-source' }),
            el('div', { className: 'stack-label' }),
          ),
          el('td', { className: 'result' }),
        );
        selectable(row, () => row.dataset.key);
        return row;
      },
      (row, t) => {
        row.dataset.id = t.id;
        row.dataset.digest = t.digest;
        row.dataset.ok = t.ok ? '1' : '0';
        setAttr(row, 'aria-current', t.id === chosenId ? 'true' : null);
        const cells = row.children;
        setText(cells[0], t.ended ? `${fmtClock(t.ended, now)} · ${fmtAgo(now - t.ended)}` : '–');
        setText(cells[1].firstChild, transferTitle(t));
        setAttr(cells[1].firstChild, 'title', t.digest);
        setText(cells[2], fmtBytes(t.size));
        setText(cells[3], t.ended ? fmtDuration(t.ended - t.started) : '–');
        renderStack(cells[4].firstChild, cells[4].lastChild, t);
        const result = cells[5];
        if (t.ok) {
          setText(result, 'ok');
          setAttr(result, 'class', 'result state ok');
          setAttr(result, 'title', t.failures ? `${t.failures} verification failures on the way` : null);
        } else {
          setText(result, t.error ? `failed: ${t.error}` : 'failed');
          setAttr(result, 'class', 'result state bad');
          setAttr(result, 'title', t.error || null);
        }
      },
    );
    $('finished-empty').hidden = finished.length > 0;

    renderChart(chosen);
  }

  function bytesDone(t) {
    let total = 0;
    for (const value of Object.values(t.bytes_by_source || {})) total += value;
    return Math.min(total, t.size);
  }

  function renderChart(t) {
    const what = t
      ? `${transferTitle(t)}${t.ended ? '' : ' (active)'} · click a transfer to show its own`
      : '';
    setText($('chart-what'), what);
    drawChart($('chart'), $('chart-legend'), t);
  }

  // ---- peers -----------------------------------------------------------------------------------

  function renderPeers() {
    const peers = P.state.peers.peers;
    reconcile(
      $('peer-rows'),
      peers,
      (p) => p.url,
      () =>
        el(
          'tr',
          { 'data-testid': 'peer-row' },
          el('td', null, el('code', { 'data-testid': 'peer-url' })),
          el('td', null, el('code', { 'data-testid': 'peer-node' })),
          el('td', { 'data-testid': 'peer-found' }),
          el('td', { className: 'num', 'data-testid': 'peer-rate' }),
          el('td', { 'data-testid': 'peer-state' }),
          el('td', { 'data-testid': 'peer-tls' }),
          el('td', { className: 'num', 'data-testid': 'peer-sent-us' }),
          el('td', { className: 'num', 'data-testid': 'peer-we-sent' }),
        ),
      (row, p) => {
        const c = row.children;
        row.dataset.url = p.url;
        row.dataset.state = p.state;
        setText(c[0].firstChild, p.url.replace(/^https?:\/\//, ''));
        setAttr(c[0].firstChild, 'title', p.url);
        setText(c[1].firstChild, p.node_id ? shortId(p.node_id) : '–');
        setAttr(c[1].firstChild, 'title', p.node_id || 'not known yet');
        setText(c[2], p.found);
        setText(c[3], fmtRate(p.rate));
        let st =
          p.state === 'backoff' && typeof p.backoff === 'number'
            ? `backoff ${fmtDuration(p.backoff)}`
            : p.state;
        if (p.bad_chunks) st += ` · ${p.bad_chunks} bad chunk${p.bad_chunks === 1 ? '' : 's'}`;
        setText(c[4], st);
        setAttr(c[4], 'class', `state ${STATE_CLASS[p.state] || ''}`.trim());
        setText(c[5], p.tls ? 'yes' : 'no');
        setAttr(c[5], 'class', p.tls ? 'ok' : 'muted');
        setText(c[6], fmtBytes(p.sent_us));
        setText(c[7], fmtBytes(p.we_sent));
      },
    );
    $('peers-empty').hidden = peers.length > 0;
  }

  function renderSwarm() {
    drawSwarm($('swarm-graph-box'), P.state.peers);
  }

  Object.assign(P, { renderImages, renderCache, renderTransfers, renderPeers, renderSwarm });
})();
