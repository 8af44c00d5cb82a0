/* p2pimg dashboard, part 2 of 6: the pictures of transfers, hand-drawn SVG. A transfer's chunk
 * map (one cell per chunk, coloured by the source that sent it), bytes by source, and the
 * throughput chart (bytes per second by source, stacked) of a pull or of one blob.
 */
(() => {
  'use strict';

  const {
    el,
    svg,
    setText,
    setAttr,
    reconcile,
    fmtBytes,
    fmtRate,
    fmtDuration,
    pct,
    fmtPct,
    sourceColor,
    sourceLabel,
    orderedSources,
  } = window.p2pimg;

  // Chunk maps larger than this are drawn with one cell per group of chunks, so a 10 GB blob
  // does not turn into ten thousand SVG elements.
  const MAX_CELLS = 1536;
  const MAP_COLUMNS = 64;

  // ---- bytes by source -------------------------------------------------------------------------

  function renderStack(bar, label, t) {
    const bySource = t.bytes_by_source || {};
    const names = orderedSources(Object.keys(bySource).filter((s) => bySource[s] > 0));
    const total = names.reduce((sum, s) => sum + bySource[s], 0);
    reconcile(
      bar,
      names,
      (s) => s,
      () => el('span', { 'data-testid': 'source-segment' }),
      (seg, s) => {
        seg.style.width = `${pct(bySource[s], total)}%`;
        seg.style.background = sourceColor(s);
        seg.dataset.source = s;
        seg.dataset.bytes = String(bySource[s]);
        setAttr(
          seg,
          'title',
          `${sourceLabel(s)}: ${fmtBytes(bySource[s])} (${fmtPct(pct(bySource[s], total))})`,
        );
      },
    );
    setAttr(
      bar,
      'aria-label',
      names.map((s) => `${sourceLabel(s)} ${fmtBytes(bySource[s])}`).join(', ') || 'no bytes',
    );
    setAttr(bar, 'role', 'img');
    setText(
      label,
      names.map((s) => `${sourceLabel(s)} ${fmtBytes(bySource[s])}`).join(' · ') || 'nothing fetched',
    );
  }

  function renderLegend(list, t, withState) {
    const bySource = t.bytes_by_source || {};
    const map = t.map || '';
    const inMap = (t.sources || []).filter((s, i) => map.includes(i.toString(36)));
    const entries = orderedSources(
      new Set([...inMap, ...Object.keys(bySource).filter((s) => bySource[s] > 0)]),
    ).map((s) => ({
      key: s,
      label: sourceLabel(s),
      color: sourceColor(s),
      bytes: bySource[s] || 0,
    }));
    if (withState && map.includes('*')) {
      entries.unshift({ key: '*', label: 'already cached', color: sourceColor('*'), bytes: null });
    }
    if (withState) {
      entries.push({ key: '~', label: 'being fetched', swatch: 'fetching', bytes: null });
      entries.push({ key: '.', label: 'missing', swatch: 'missing', bytes: null });
    }
    reconcile(
      list,
      entries,
      (e) => e.key,
      () =>
        el(
          'li',
          null,
          el('span', { className: 'swatch', 'aria-hidden': 'true' }),
          el('span', { className: 'label' }),
          el('span', { className: 'bytes' }),
        ),
      (li, e) => {
        const [swatch, label, bytes] = li.children;
        if (e.swatch) setAttr(swatch, 'class', `swatch ${e.swatch}`);
        else swatch.style.background = e.color;
        setText(label, e.label);
        setText(bytes, e.bytes === null ? '' : fmtBytes(e.bytes));
        li.dataset.source = e.key;
        setAttr(li, 'title', e.key.length > 1 ? e.key : null);
      },
    );
  }

  // ---- chunk map -------------------------------------------------------------------------------

  let patternCount = 0;

  function chunkMap() {
    const id = `stripes-${(patternCount += 1)}`;
    const root = svg(
      'svg',
      {
        className: 'chunkmap',
        'data-testid': 'chunk-map',
        role: 'img',
        preserveAspectRatio: 'xMinYMin meet',
      },
      svg(
        'defs',
        null,
        svg(
          'pattern',
          { id, width: 4, height: 4, patternUnits: 'userSpaceOnUse', patternTransform: 'rotate(45)' },
          svg('rect', { width: 4, height: 4, className: 'missing' }),
          svg('rect', { width: 2, height: 4, fill: 'var(--accent)' }),
        ),
      ),
      svg('g'),
    );
    root.dataset.pattern = id;
    return root;
  }

  // Each cell is a group of `group` chunks, coloured by the source that delivered most of them;
  // a group with a chunk in flight is striped, one with a missing chunk grey (progress shows as
  // solid colour only once a whole cell is in).
  function cellState(map, start, end) {
    let fetching = false;
    let missing = false;
    const counts = new Map();
    for (let i = start; i < end; i += 1) {
      const c = map[i];
      if (c === '~') fetching = true;
      else if (c === '.' || c === undefined) missing = true;
      else counts.set(c, (counts.get(c) || 0) + 1);
    }
    if (fetching) return '~';
    if (missing) return '.';
    let best = '.';
    let bestCount = -1;
    for (const [c, n] of counts) {
      if (n > bestCount) {
        best = c;
        bestCount = n;
      }
    }
    return best;
  }

  const CELL = 10;
  const GAP = 2;

  function updateChunkMap(root, t) {
    const map = String(t.map || '');
    const chunks = Math.max(t.chunks || 0, map.length);
    const group = Math.max(1, Math.ceil(chunks / MAX_CELLS));
    const cells = Math.ceil(chunks / group);
    const cols = Math.min(MAP_COLUMNS, Math.max(cells, 1));
    const rows = Math.max(1, Math.ceil(cells / cols));
    const width = cols * (CELL + GAP) - GAP;
    const height = rows * (CELL + GAP) - GAP;
    setAttr(root, 'viewBox', `0 0 ${width} ${height}`);
    setAttr(root, 'width', width);
    setAttr(root, 'height', height);
    root.dataset.chunks = String(chunks);
    root.dataset.have = String(t.have);
    setAttr(root, 'aria-label', `chunk map: ${t.have} of ${chunks} chunks here`);
    const layer = root.lastChild;
    while (layer.children.length > cells) layer.lastChild.remove();
    while (layer.children.length < cells) {
      const i = layer.children.length;
      layer.append(
        svg('rect', {
          x: (i % cols) * (CELL + GAP),
          y: Math.floor(i / cols) * (CELL + GAP),
          width: CELL,
          height: CELL,
          rx: 2,
        }),
      );
    }
    const sources = t.sources || [];
    const stripes = `url(#${root.dataset.pattern})`;
    for (let i = 0; i < cells; i += 1) {
      const rect = layer.children[i];
      setAttr(rect, 'x', (i % cols) * (CELL + GAP));
      setAttr(rect, 'y', Math.floor(i / cols) * (CELL + GAP));
      const c = cellState(map, i * group, Math.min(chunks, (i + 1) * group));
      if (rect.dataset.s === c) continue;
      rect.dataset.s = c;
      if (c === '.') {
        rect.setAttribute('class', 'missing');
        rect.removeAttribute('fill');
      } else {
        rect.removeAttribute('class');
        if (c === '~') rect.setAttribute('fill', stripes);
        else if (c === '*') rect.setAttribute('fill', sourceColor('*'));
        else {
          const index = parseInt(c, 36);
          rect.setAttribute(
            'fill',
            sourceColor(sources[index] !== undefined ? sources[index] : `unknown ${c}`),
          );
        }
      }
    }
    return group;
  }

  // ---- throughput chart ------------------------------------------------------------------------

  function niceCeiling(value) {
    if (value <= 0) return 1;
    const exp = Math.pow(10, Math.floor(Math.log10(value)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * exp >= value) return m * exp;
    return 10 * exp;
  }

  // The chart's top and how many gridlines divide it: round numbers of binary units (0, 5, 10,
  // 15... MiB/s), four intervals or five, whichever gives labels with at most one decimal.
  function rateScale(value) {
    let unit = 1;
    while (value / unit >= 1024 && unit < Math.pow(1024, 4)) unit *= 1024;
    const top = value > 0 ? niceCeiling(value / unit) : 1;
    const steps = Number.isInteger(((top / 4) * 10).toFixed(6) * 1) ? 4 : 5;
    return { top: top * unit, steps };
  }

  // `t`: what to draw, a pull or one blob's transfer: {kind: 'pull' | 'blob', id, label,
  // series: {start, step, by_source}, bytes_by_source}, or null.
  const TIME_STEPS = [0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600];

  function drawChart(box, legend, t) {
    // Drawn at the box's own pixel width, so the text in it is not scaled up or down.
    const W = Math.max(320, Math.round(box.clientWidth || 720));
    const H = 210;
    const pad = { l: 78, r: 12, t: 10, b: 28 };
    const iw = W - pad.l - pad.r;
    const ih = H - pad.t - pad.b;
    const series = t && t.series ? t.series : null;
    const bySource = series && series.by_source ? series.by_source : {};
    const names = orderedSources(Object.keys(bySource));
    const step = series && series.step > 0 ? series.step : 1;
    const n = names.reduce((m, s) => Math.max(m, (bySource[s] || []).length), 0);
    let total = 0;
    for (const s of names) for (const v of bySource[s] || []) total += v;
    const root = svg('svg', {
      viewBox: `0 0 ${W} ${H}`,
      role: 'img',
      'data-testid': 'throughput-chart',
      'data-kind': t ? t.kind : '',
      'data-id': t ? t.id : '',
      'data-bytes': total,
      'aria-label': t ? `Bytes per second by source for ${t.label}` : 'Nothing to show',
    });
    if (!t || n === 0) {
      // Nothing to plot: a line of text, not an empty frame as tall as a chart.
      setAttr(root, 'viewBox', `0 0 ${W} 48`);
      root.append(
        svg('text', {
          x: W / 2,
          y: 28,
          'text-anchor': 'middle',
          className: 'empty-chart',
          text: t ? 'No bytes yet' : 'Pull an image to see where its bytes come from',
        }),
      );
      box.replaceChildren(root);
      legend.replaceChildren();
      return;
    }
    // Stack the rates (bytes in a step / step) source by source.
    const stacks = [];
    const base = new Array(n).fill(0);
    for (const s of names) {
      const values = bySource[s] || [];
      const lower = base.slice();
      for (let i = 0; i < n; i += 1) base[i] += (values[i] || 0) / step;
      stacks.push({ s, lower, upper: base.slice() });
    }
    const { top, steps } = rateScale(Math.max(...base));
    // Each sample is the rate over one step, drawn as a flat run across that step.
    const x = (i) => pad.l + (i / n) * iw;
    const y = (v) => pad.t + ih - (v / top) * ih;

    const axis = svg('g', { className: 'axis' });
    for (let k = 0; k <= steps; k += 1) {
      const v = (top * k) / steps;
      axis.append(svg('line', { x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v), className: 'gridline' }));
      axis.append(svg('text', { x: pad.l - 8, y: y(v) + 4, 'text-anchor': 'end', text: fmtRate(v) }));
    }
    // Time ticks at round numbers of seconds (0, 250 ms, 500 ms... or 0, 2 s, 4 s...), at most
    // six of them, the last one drawn only where its label fits.
    const duration = n * step;
    const every = TIME_STEPS.find((s) => duration / s <= 6) || Math.ceil(duration / 6);
    for (let k = 0; k * every <= duration + 1e-9; k += 1) {
      const at = pad.l + ((k * every) / duration) * iw;
      if (k > 0 && W - pad.r - at < 24 && W - pad.r - at > 0.5) continue;
      const anchor = k === 0 ? 'start' : W - pad.r - at < 30 ? 'end' : 'middle';
      axis.append(
        svg('text', {
          x: at,
          y: H - 8,
          'text-anchor': anchor,
          text: k === 0 ? '0 s' : fmtDuration(k * every),
        }),
      );
    }
    root.append(axis);

    for (const { s, lower, upper } of stacks) {
      let d = `M ${x(0)} ${y(upper[0])}`;
      for (let i = 0; i < n; i += 1) d += ` L ${x(i)} ${y(upper[i])} L ${x(i + 1)} ${y(upper[i])}`;
      for (let i = n - 1; i >= 0; i -= 1) d += ` L ${x(i + 1)} ${y(lower[i])} L ${x(i)} ${y(lower[i])}`;
      d += ' Z';
      const color = sourceColor(s);
      const area = svg('path', {
        d,
        fill: color,
        'fill-opacity': 0.55,
        stroke: color,
        'stroke-width': 1.2,
        'stroke-linejoin': 'round',
        'data-source': s,
      });
      area.append(
        svg('title', {
          text: `${sourceLabel(s)}: ${fmtBytes((bySource[s] || []).reduce((a, b) => a + b, 0))}`,
        }),
      );
      root.append(area);
    }
    box.replaceChildren(root);
    renderLegend(legend, { sources: names, bytes_by_source: t.bytes_by_source || {} }, false);
  }

  Object.assign(window.p2pimg, { renderStack, renderLegend, chunkMap, updateChunkMap, drawChart });
})();
