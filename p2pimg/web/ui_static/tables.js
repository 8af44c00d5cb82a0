/* p2pimg dashboard, part 4 of 6: the tables (images, cache, peers), each kept in step with the
 * last poll. The state and the actions are app.js's, reached through window.p2pimg when
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
    pct,
    fmtPct,
    shortMiddle,
    shortDigest,
    shortId,
    STATE_CLASS,
    drawSwarm,
  } = P;

  // ---- images --------------------------------------------------------------------------------

  const refOf = (image) => `${image.name}:${image.tag}`;
  // Images pulled through --upstream have no root CID: the actions, which take a NAME:TAG of
  // the origin or ipfs/<CID>, do not apply to them.
  const isMirror = (image) => image.kind === 'mirror';

  function imageRow() {
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
        el('span', { className: 'badge kind', 'data-testid': 'image-kind' }),
        el('span', { className: 'badge kind upstream', 'data-testid': 'image-upstream', hidden: true }),
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
  }

  function updateImage(row, img, ro) {
    const ref = refOf(img);
    const mirror = isMirror(img);
    const cells = row.children;
    row.dataset.ref = ref;
    row.dataset.kind = img.kind || '';
    row.dataset.root = img.root || '';
    row.dataset.digest = img.digest || '';
    const shown = img.name.startsWith('ipfs/') ? `ipfs/${shortMiddle(img.name.slice(5), 10, 6)}` : img.name;
    const [name, kind, upstream] = cells[0].children;
    setText(name, shown);
    setAttr(name, 'title', img.name);
    setText(kind, img.kind || '');
    upstream.hidden = !mirror;
    setText(upstream, mirror ? img.upstream || 'upstream' : '');
    setAttr(upstream, 'title', mirror ? `pulled through the upstream ${img.upstream} (--upstream)` : null);
    setText(cells[1], img.tag);
    const id = cells[2].firstChild;
    if (mirror) {
      // Where a p2pimg image has its root CID: the digest of the manifest the upstream served.
      setText(id, img.digest ? `sha256:${shortDigest(img.digest)}` : '–');
      setAttr(id, 'title', img.digest ? `manifest ${img.digest}` : null);
      setAttr(id, 'class', 'digest');
    } else {
      setText(id, img.root ? shortMiddle(img.root, 10, 6) : 'unresolved');
      setAttr(id, 'title', img.root || img.error || null);
      setAttr(id, 'class', img.root ? null : 'bad');
    }
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
    pin.hidden = mirror;
    warm.hidden = mirror;
    pin.dataset.ref = ref;
    pin.dataset.pinned = img.pinned ? '1' : '0';
    setText(pin, img.pinned ? 'Unpin' : 'Pin');
    setAttr(pin, 'aria-label', `${img.pinned ? 'Unpin' : 'Pin'} ${ref}`);
    warm.dataset.ref = ref;
    setAttr(warm, 'aria-label', `Warm ${ref}`);
    pin.disabled = ro || pin.dataset.busy === '1';
    warm.disabled = ro || Boolean(P.state.warm && P.state.warm.state === 'running');
  }

  function renderImages() {
    const ro = P.isReadOnly();
    reconcile(
      $('image-rows'),
      P.state.images,
      (img) => `${img.kind}|${img.upstream || ''}|${refOf(img)}|${img.root || img.digest || ''}`,
      imageRow,
      (row, img) => updateImage(row, img, ro),
    );
    // What the list is made of, so an empty one says how to fill it.
    const node = P.state.node;
    const upstreams = node && Array.isArray(node.upstreams) && node.upstreams.length > 0;
    setText(
      $('images-empty'),
      'No images: none is published to the origin (p2pimg publish) or pinned here' +
        (upstreams ? ', and none was pulled through this registry from its upstream yet.' : '.'),
    );
    $('images-empty').hidden = P.state.images.length > 0;
  }

  // ---- cache ---------------------------------------------------------------------------------

  function renderCache() {
    const c = P.state.cache;
    if (!c) return;
    const limit = typeof c.limit === 'number' && c.limit > 0 ? c.limit : null;
    const free = typeof c.disk_free === 'number' ? c.disk_free : null;
    // Without --cache-max the cache may grow until its file system is full: the bar is what it
    // uses of what it could use, never drawn full just because there is no limit.
    const whole = limit || (free !== null ? c.used + free : 0);
    const usedPct = pct(c.used, whole);
    const fill = $('cache-fill');
    fill.style.width = `${usedPct}%`;
    fill.style.minWidth = c.used > 0 ? '3px' : '0';
    fill.classList.toggle('high', limit !== null && usedPct >= 90);
    $('cache-pinned-fill').style.width = `${pct(Math.min(c.pinned, c.used), whole)}%`;
    const meter = $('cache-meter');
    meter.dataset.used = String(c.used);
    meter.dataset.whole = String(whole);
    setAttr(meter, 'aria-valuenow', Math.round(usedPct));
    // An amount is not split across two lines ("47.4" at the end of one, "GiB" on the next).
    const nb = (n) => fmtBytes(n).replace(' ', '\u00a0');
    const onDisk = free !== null ? `${nb(free)} free on disk` : '';
    setAttr(
      meter,
      'aria-valuetext',
      limit
        ? `${fmtBytes(c.used)} of ${fmtBytes(limit)}`
        : `${fmtBytes(c.used)}, no limit${onDisk ? `, ${onDisk}` : ''}`,
    );
    setText($('cache-used'), fmtBytes(c.used));
    setText(
      $('cache-limit'),
      limit ? `of ${nb(limit)} (${fmtPct(usedPct)})` : 'used · no limit (--cache-max)',
    );
    // With a limit, the disk matters only when it cannot hold what the limit allows.
    const short = limit && free !== null && free < limit - c.used;
    setText($('cache-disk'), limit ? (short ? `only ${onDisk}` : '') : onDisk);
    setAttr($('cache-disk'), 'class', short ? 'meter-note warn' : 'meter-note');
    const disk =
      typeof c.disk_size === 'number' ? `the cache's file system holds ${fmtBytes(c.disk_size)}` : null;
    setAttr($('cache-disk'), 'title', disk);
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

  // ---- peers -----------------------------------------------------------------------------------

  const STATE_TITLE = {
    unreachable: 'it never answered, or its last inventory poll failed',
    backoff: 'it failed or stalled: not asked again until its backoff ends',
    banned: 'it sent bytes that did not match their CID or digest: not asked again',
  };

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
        // Bytes/s over the last 2 s: an idle peer has no rate worth a number.
        setText(c[3], p.rate > 0 ? fmtRate(p.rate) : '—');
        setAttr(c[3], 'title', 'bytes per second it sent us over the last 2 s');
        let st =
          p.state === 'backoff' && typeof p.backoff === 'number'
            ? `backoff ${fmtDuration(p.backoff)}`
            : p.state;
        if (p.bad_chunks) st += ` · ${p.bad_chunks} bad chunk${p.bad_chunks === 1 ? '' : 's'}`;
        setText(c[4], st);
        setAttr(c[4], 'class', `state ${STATE_CLASS[p.state] || ''}`.trim());
        setAttr(c[4], 'title', STATE_TITLE[p.state] || null);
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

  Object.assign(P, { renderImages, renderCache, renderPeers, renderSwarm });
})();
