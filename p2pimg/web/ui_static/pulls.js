/* p2pimg dashboard, part 5 of 6: transfers. The blobs being fetched now, each with its chunk map;
 * the pulls (the blobs of one image a client pulled, as the node groups them), each with its time
 * and bytes by source and, expanded, its blobs; and the throughput chart of the pull or the blob
 * clicked last (the latest pull until then).
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
    shortDigest,
    renderStack,
    renderLegend,
    chunkMap,
    updateChunkMap,
    drawChart,
  } = P;

  const COLUMNS = 8; // of the pulls table, which an expanded pull's blobs span
  // A pull no client named: a warm's blobs, or an image's small blobs the node read on its own.
  const UNNAMED_TITLE = 'Blobs no client asked for by name: a warm, or what the node read of an image itself';

  const transferTitle = (t) => `${t.repository ? `${t.repository} · ` : ''}${shortDigest(t.digest)}`;
  const pullTitle = (p) => p.repository || 'no image named';
  const okAttr = (ok) => (ok === true ? '1' : ok === false ? '0' : '');

  // ---- what the chart shows --------------------------------------------------------------------

  function transfersById() {
    const byId = new Map();
    for (const t of P.state.transfers.finished) byId.set(t.id, t);
    for (const t of P.state.transfers.active) byId.set(t.id, t);
    return byId;
  }

  // The pull or blob clicked, while it is still listed; else the latest pull.
  function chosen(byId) {
    const { pulls } = P.state.transfers;
    const sel = P.state.selected;
    if (sel && sel.kind === 'pull') {
      const pull = pulls.find((p) => p.id === sel.id);
      if (pull) return { kind: 'pull', item: pull };
    }
    if (sel && sel.kind === 'blob' && byId.has(sel.id)) return { kind: 'blob', item: byId.get(sel.id) };
    return pulls.length ? { kind: 'pull', item: pulls[0], latest: true } : null;
  }

  function select(kind, id) {
    P.state.selected = kind ? { kind, id } : null;
    renderTransfers();
  }

  function selectable(node, kind, getId) {
    node.tabIndex = 0;
    node.addEventListener('click', (event) => {
      if (event.target.closest('button, a')) return;
      select(kind, getId());
    });
    node.addEventListener('keydown', (event) => {
      if (event.target !== node) return;
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        select(kind, getId());
      }
    });
  }

  const isChosen = (choice, kind, id) => Boolean(choice && choice.kind === kind && choice.item.id === id);

  // ---- the blobs being fetched -------------------------------------------------------------------

  function bytesDone(t) {
    let total = 0;
    for (const value of Object.values(t.bytes_by_source || {})) total += value;
    return Math.min(total, t.size);
  }

  function renderActive(choice) {
    const { active, now } = P.state.transfers;
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
        selectable(item, 'blob', () => item.dataset.key);
        setAttr(item, 'aria-label', `Transfer ${t.digest}`);
        return item;
      },
      (item, t) => {
        item.dataset.id = t.id;
        item.dataset.digest = t.digest;
        item.dataset.have = String(t.have);
        item.dataset.chunks = String(t.chunks);
        setAttr(item, 'aria-current', isChosen(choice, 'blob', t.id) ? 'true' : null);
        const [what, progress, rate, failures] = item.firstChild.children;
        setText(what, transferTitle(t));
        setAttr(what, 'title', t.digest);
        setText(
          progress,
          `${fmtBytes(bytesDone(t))} of ${fmtBytes(t.size)} · ${t.have}/${t.chunks} chunks · ` +
            fmtDuration(now - t.started),
        );
        setText(rate, fmtRate(t.rate));
        setText(
          failures,
          t.failures ? `${t.failures} verification failure${t.failures === 1 ? '' : 's'}` : 'no failures',
        );
        setAttr(failures, 'class', t.failures ? 'meta failures bad' : 'meta failures');
        const group = updateChunkMap(item.children[1], t);
        setText(
          item.children[2],
          group > 1
            ? `one cell = ${group} chunks of ${fmtBytes(t.chunk_size)}`
            : `one cell = one chunk of ${fmtBytes(t.chunk_size)}`,
        );
        renderLegend(item.children[3], t, true);
      },
    );
    $('active-empty').hidden = active.length > 0;
    $('active-title').hidden = active.length === 0;
  }

  // ---- pulls -------------------------------------------------------------------------------------

  function setResult(cell, ok, text, title) {
    setText(cell, text);
    setAttr(cell, 'class', `result state ${ok === true ? 'ok' : ok === false ? 'bad' : 'running'}`);
    setAttr(cell, 'title', title || null);
  }

  function pullBody(pull) {
    const toggle = el(
      'button',
      {
        type: 'button',
        className: 'expand',
        'aria-expanded': 'false',
        'data-testid': 'pull-expand',
      },
      el('span', { className: 'chevron', 'aria-hidden': 'true' }),
    );
    const body = el(
      'tbody',
      { className: 'pull' },
      el(
        'tr',
        { className: 'selectable', 'data-testid': 'pull-row' },
        el('td', { className: 'toggle' }, toggle),
        el('td', { className: 'when' }),
        el('td', null, el('span', { className: 'name' })),
        el('td', { className: 'num' }),
        el('td', { className: 'num' }),
        el('td', { className: 'num' }),
        el(
          'td',
          null,
          el('div', { className: 'stack', 'data-testid': 'bytes-by-source' }),
          el('div', { className: 'stack-label' }),
        ),
        el('td', { className: 'result' }),
      ),
      el(
        'tr',
        { className: 'pull-blobs', hidden: true },
        el(
          'td',
          { colspan: COLUMNS },
          el(
            'table',
            { className: 'blobs' },
            el(
              'thead',
              null,
              el(
                'tr',
                null,
                el('th', { scope: 'col', text: 'Blob' }),
                el('th', { scope: 'col', className: 'num', text: 'Size' }),
                el('th', { scope: 'col', className: 'num', text: 'Time' }),
                el('th', { scope: 'col', className: 'wide', text: 'Bytes by source' }),
                el('th', { scope: 'col', text: 'Result' }),
              ),
            ),
            el('tbody'),
          ),
        ),
      ),
    );
    toggle.addEventListener('click', () => {
      const id = body.dataset.key;
      if (P.state.expanded.has(id)) P.state.expanded.delete(id);
      else P.state.expanded.add(id);
      renderTransfers();
    });
    selectable(body.firstChild, 'pull', () => body.dataset.key);
    setAttr(toggle, 'aria-label', `Blobs of the pull of ${pullTitle(pull)}`);
    return body;
  }

  function updatePull(body, pull, choice, byId) {
    const { now } = P.state.transfers;
    const [row, detail] = body.children;
    const expanded = P.state.expanded.has(pull.id);
    body.dataset.id = pull.id;
    row.dataset.id = pull.id;
    row.dataset.repository = pull.repository || '';
    row.dataset.ok = okAttr(pull.ok);
    row.dataset.size = String(pull.size);
    setAttr(row, 'aria-current', isChosen(choice, 'pull', pull.id) ? 'true' : null);
    const cells = row.children;
    const toggle = cells[0].firstChild;
    setAttr(toggle, 'aria-expanded', expanded ? 'true' : 'false');
    setAttr(toggle, 'title', expanded ? 'Hide its blobs' : 'Show its blobs');
    setText(cells[1], `${fmtClock(pull.started, now)} · ${fmtAgo(now - pull.started)}`);
    const name = cells[2].firstChild;
    setText(name, pullTitle(pull));
    setAttr(name, 'class', pull.repository ? 'name' : 'name muted');
    setAttr(name, 'title', pull.repository || UNNAMED_TITLE);
    setText(cells[3], `${fmtDuration(pull.seconds)}${pull.ended === null ? ' …' : ''}`);
    setText(cells[4], fmtBytes(pull.size));
    setText(cells[5], String(pull.blobs));
    renderStack(cells[6].firstChild, cells[6].lastChild, pull);
    const blobs = pull.transfers.map((id) => byId.get(id)).filter(Boolean);
    const failed = blobs.filter((t) => t.ok === false);
    if (pull.ok === null) {
      const done = blobs.filter((t) => t.ended !== null).length;
      setResult(cells[7], null, `running · ${done}/${pull.blobs} blobs`);
    } else if (pull.ok) setResult(cells[7], true, 'ok');
    else {
      const first = failed.find((t) => t.error);
      setResult(
        cells[7],
        false,
        `failed: ${failed.length} of ${pull.blobs} blob${pull.blobs === 1 ? '' : 's'}`,
        first ? first.error : null,
      );
    }
    detail.hidden = !expanded;
    const list = detail.querySelector('tbody');
    if (!expanded) {
      list.replaceChildren();
      return;
    }
    blobs.sort((a, b) => a.started - b.started);
    reconcile(
      list,
      blobs,
      (t) => t.id,
      blobRow,
      (r, t) => updateBlob(r, t, choice),
    );
  }

  function blobRow() {
    const row = el(
      'tr',
      { className: 'selectable', 'data-testid': 'pull-blob' },
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
    selectable(row, 'blob', () => row.dataset.key);
    return row;
  }

  function updateBlob(row, t, choice) {
    const { now } = P.state.transfers;
    row.dataset.id = t.id;
    row.dataset.digest = t.digest;
    row.dataset.ok = okAttr(t.ok);
    setAttr(row, 'aria-current', isChosen(choice, 'blob', t.id) ? 'true' : null);
    const cells = row.children;
    setText(cells[0].firstChild, transferTitle(t));
    setAttr(cells[0].firstChild, 'title', t.digest);
    setText(cells[1], fmtBytes(t.size));
    setText(cells[2], fmtDuration((t.ended === null ? now : t.ended) - t.started));
    renderStack(cells[3].firstChild, cells[3].lastChild, t);
    if (t.ok === null) setResult(cells[4], null, `running · ${t.have}/${t.chunks} chunks`);
    else if (t.ok) {
      const note = t.failures ? `${t.failures} verification failures on the way` : null;
      setResult(cells[4], true, 'ok', note);
    } else setResult(cells[4], false, t.error ? `failed: ${t.error}` : 'failed', t.error);
  }

  // ---- all of it -------------------------------------------------------------------------------

  function renderTransfers() {
    const byId = transfersById();
    const choice = chosen(byId);
    renderActive(choice);
    const { pulls } = P.state.transfers;
    const listed = new Set(pulls.map((p) => p.id));
    for (const id of P.state.expanded) if (!listed.has(id)) P.state.expanded.delete(id);
    reconcile(
      $('pull-table'),
      pulls,
      (p) => p.id,
      pullBody,
      (body, p) => updatePull(body, p, choice, byId),
    );
    $('pulls-empty').hidden = pulls.length > 0;
    $('pull-table').hidden = pulls.length === 0;
    renderChart(choice);
  }

  function renderChart(choice) {
    const { now } = P.state.transfers;
    let shown = null;
    let what = '';
    if (choice && choice.kind === 'pull') {
      const p = choice.item;
      const running = p.ended === null ? ', running' : '';
      what =
        `${choice.latest ? 'latest pull: ' : 'pull: '}${pullTitle(p)} at ${fmtClock(p.started, now)}` +
        ` (${p.blobs} blob${p.blobs === 1 ? '' : 's'}${running})`;
      shown = { ...p, kind: 'pull', id: p.id, label: `the pull of ${pullTitle(p)}` };
    } else if (choice) {
      const t = choice.item;
      what = `blob: ${transferTitle(t)}${t.ended === null ? ' (running)' : ''}`;
      shown = { ...t, kind: 'blob', id: t.id, label: t.digest };
    }
    setText($('chart-what'), what);
    const chart = $('chart');
    chart.dataset.kind = shown ? shown.kind : '';
    chart.dataset.id = shown ? shown.id : '';
    $('chart-latest').hidden = !choice || Boolean(choice.latest);
    drawChart(chart, $('chart-legend'), shown);
  }

  Object.assign(P, { renderTransfers, selectTransfer: select });
})();
