/* p2pimg dashboard, part 3 of 6: the swarm as a small graph, hand-drawn SVG: this node in the
 * middle, its peers and the nodes that fetch from it around it, an edge per direction as wide as
 * the bytes that went that way.
 */
(() => {
  'use strict';

  const { svg, setAttr, fmtBytes, STATE_CLASS } = window.p2pimg;

  const MAX_GRAPH_NODES = 16;
  const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;

  function swarmNodes(doc) {
    // Our peers, then the nodes that fetch from us without being our peers (clients of our peer
    // listener).
    return [
      ...doc.peers.map((p) => ({
        key: p.url,
        label: p.url.replace(/^https?:\/\//, ''),
        state: p.state,
        inBytes: p.sent_us || 0,
        outBytes: p.we_sent || 0,
        peer: p,
      })),
      ...(doc.clients || []).map((c) => ({
        key: c.address,
        label: c.address,
        state: 'client',
        inBytes: 0,
        outBytes: c.we_sent || 0,
        peer: null,
      })),
    ];
  }

  function drawSwarm(box, doc) {
    // Each other node drawn around this one on an ellipse, with one edge per direction that
    // carried bytes. Drawn at the box's own pixel width, so labels keep their size whatever the
    // card's width; the height grows to fit the labels once they are placed.
    const others = swarmNodes(doc);
    const shown = others.slice(0, MAX_GRAPH_NODES);
    const W = Math.max(240, Math.round(box.clientWidth || 360));
    // Where the card is wide, the nodes on the left and right have their labels beside them;
    // more nodes get a larger ellipse.
    const sideLabels = W >= 480;
    const ry = Math.min(130, 78 + 6 * Math.max(0, shown.length - 4));
    const rx = Math.max(60, Math.min(W / 2 - (sideLabels ? 150 : 60), 2.6 * ry));
    const cx = W / 2;
    const cy = ry + 46;
    const root = svg('svg', {
      role: 'img',
      'data-testid': 'swarm-graph',
      'aria-label': `This node, ${plural(doc.peers.length, 'peer')}, ${plural((doc.clients || []).length, 'client')}`,
    });
    const maxBytes = shown.reduce((m, o) => Math.max(m, o.inBytes, o.outBytes), 0);
    // Width grows with the logarithm of the bytes: a peer that sent 1 GB must not dwarf one that
    // sent 10 MB into invisibility.
    const widthFor = (b) => (b > 0 && maxBytes > 0 ? 1.5 + 7 * (Math.log1p(b) / Math.log1p(maxBytes)) : 0);
    const edges = svg('g');
    const nodes = svg('g');
    const labels = [];
    shown.forEach((o, i) => {
      const angle =
        -Math.PI / 2 + (2 * Math.PI * i) / Math.max(shown.length, 1) + (shown.length === 2 ? Math.PI / 2 : 0);
      const px = cx + rx * Math.cos(angle);
      const py = cy + ry * Math.sin(angle);
      // Two parallel lines, one per direction, offset sideways so both stay visible.
      const len = Math.hypot(px - cx, py - cy) || 1;
      const nx = (-(py - cy) / len) * 3.5;
      const ny = ((px - cx) / len) * 3.5;
      const win = widthFor(o.inBytes);
      const wout = widthFor(o.outBytes);
      if (!win && !wout) {
        edges.append(
          svg('line', { x1: cx, y1: cy, x2: px, y2: py, className: 'edge-idle', 'stroke-width': 1.5 }),
        );
      }
      for (const [w, sign, cls, bytes, title] of [
        [win, 1, 'edge-in', o.inBytes, `${o.label} sent us ${fmtBytes(o.inBytes)}`],
        [wout, -1, 'edge-out', o.outBytes, `we sent ${o.label} ${fmtBytes(o.outBytes)}`],
      ]) {
        if (!w) continue;
        const line = svg('line', {
          x1: cx + sign * nx,
          y1: cy + sign * ny,
          x2: px + sign * nx,
          y2: py + sign * ny,
          className: cls,
          'stroke-width': w,
          'stroke-linecap': 'round',
          'data-bytes': bytes,
        });
        line.append(svg('title', { text: title }));
        edges.append(line);
      }
      const known = o.state in STATE_CLASS || o.state === 'client';
      const g = svg('g', { 'data-testid': 'swarm-node', 'data-url': o.key, 'data-state': o.state });
      g.append(svg('circle', { cx: px, cy: py, r: 11, className: 'halo', 'stroke-width': 1 }));
      g.append(svg('circle', { cx: px, cy: py, r: 7, className: `node-${known ? o.state : 'ok'}` }));
      // The address, and under it the bytes each way (↓ sent us, ↑ we sent): beside the nodes on
      // the left and right, else above the nodes of the upper half and below those of the lower
      // half, away from the edges.
      const below = py >= cy - 1;
      const side = sideLabels && Math.abs(Math.cos(angle)) > 0.5 ? Math.sign(Math.cos(angle)) : 0;
      const lx = px + 16 * side;
      const y0 = side ? py - 3 : below ? py + 24 : py - 29;
      const anchor = side > 0 ? 'start' : side < 0 ? 'end' : 'middle';
      const label = svg('g', { className: 'swarm-label' });
      label.append(svg('text', { x: lx, y: y0, 'text-anchor': anchor, text: o.label }));
      const state = o.peer && o.state !== 'ok' ? `${o.state} · ` : '';
      label.append(
        svg('text', {
          x: lx,
          y: y0 + 13,
          'text-anchor': anchor,
          className: `traffic${STATE_CLASS[o.state] && o.state !== 'ok' ? ` ${STATE_CLASS[o.state]}` : ''}`,
          text: `${state}↓ ${fmtBytes(o.inBytes)}  ↑ ${fmtBytes(o.outBytes)}`,
        }),
      );
      g.append(label);
      labels.push({ node: label, below, px, py });
      g.append(
        svg('title', {
          text: o.peer
            ? `${o.peer.url} (${o.peer.state}, found by ${o.peer.found})`
            : `${o.label} fetches from us (not our peer)`,
        }),
      );
      nodes.append(g);
    });
    const me = svg('g', { 'data-testid': 'swarm-node', 'data-me': '1' });
    me.append(svg('circle', { cx, cy, r: 16, className: 'halo', 'stroke-width': 1 }));
    me.append(svg('circle', { cx, cy, r: 11, className: 'node-me' }));
    me.append(svg('title', { text: `this node ${doc.me || ''}`.trim() }));
    const mine = svg('g', { className: 'swarm-label' });
    mine.append(
      svg('text', { x: cx, y: cy + 32, 'text-anchor': 'middle', className: 'me-label', text: 'this node' }),
    );
    if (!shown.length) {
      const none = 'no peers, and nobody fetches from us';
      mine.append(svg('text', { x: cx, y: cy + 46, 'text-anchor': 'middle', text: none }));
    }
    me.append(mine);
    labels.unshift({ node: mine, below: true, px: cx, py: cy });
    nodes.append(me);
    root.append(edges, nodes);
    box.replaceChildren(root);
    let [top, bottom] = placeLabels(labels, cx, cy, W);
    if (others.length > shown.length) {
      bottom += 18;
      root.append(
        svg('text', {
          x: W - 4,
          y: bottom - 4,
          'text-anchor': 'end',
          text: `+${others.length - shown.length} more`,
        }),
      );
    }
    // Only as tall as what is drawn: two nodes side by side need no room above them.
    top = Math.floor(top - 6);
    setAttr(root, 'viewBox', `0 ${top} ${W} ${Math.ceil(bottom + 6 - top)}`);
  }

  // Labels are measured once in the page and moved apart where they would overlap each other or
  // a node (long addresses, many nodes, a narrow card): those below the middle downwards, those
  // above upwards, and all of them kept inside the picture's width. Returns the vertical extent
  // of the picture, [top, bottom].
  function placeLabels(labels, cx, cy, W) {
    const boxes = [{ x: cx - 17, y: cy - 17, w: 34, h: 34 }];
    for (const l of labels) boxes.push({ x: l.px - 12, y: l.py - 12, w: 24, h: 24 });
    const overlaps = (a, b) =>
      a.x < b.x + b.w + 4 && b.x < a.x + a.w + 4 && a.y < b.y + b.h + 1 && b.y < a.y + a.h + 1;
    let top = Math.min(...boxes.map((b) => b.y));
    let bottom = Math.max(...boxes.map((b) => b.y + b.h));
    // Those below from the middle down, those above from the middle up: each moves away from
    // the ones already placed nearer the middle.
    const below = labels.filter((l) => l.below).sort((a, b) => a.py - b.py);
    const above = labels.filter((l) => !l.below).sort((a, b) => b.py - a.py);
    for (const l of [...below, ...above]) {
      const b = l.node.getBBox();
      if (!b.width) continue; // not laid out (the card is hidden): drawn where it is
      const box = { x: b.x, y: b.y, w: b.width, h: b.height };
      let dx = 0;
      if (box.x < 2) dx = 2 - box.x;
      else if (box.x + box.w > W - 2) dx = W - 2 - box.x - box.w;
      box.x += dx;
      for (let tries = 0, moved = true; moved && tries < 40; tries += 1) {
        moved = false;
        for (const other of boxes) {
          if (!overlaps(box, other)) continue;
          box.y = l.below ? other.y + other.h + 2 : other.y - box.h - 2;
          moved = true;
        }
      }
      boxes.push(box);
      top = Math.min(top, box.y);
      bottom = Math.max(bottom, box.y + box.h);
      if (dx || box.y !== b.y) setAttr(l.node, 'transform', `translate(${dx} ${box.y - b.y})`);
    }
    return [top, bottom];
  }

  Object.assign(window.p2pimg, { drawSwarm });
})();
