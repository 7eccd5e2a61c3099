"""A snapshot as a self-contained HTML flame graph.

One file, nothing fetched: the page carries its data as JSON, its style and
its script inline, and the script draws the graph as SVG when the page
opens (so that zooming can redraw it).  It can be mailed, attached to a bug
or opened from a CI artifact with no network.

Layout: the root (all sampled bytes) at the top, each stack below it from
the oldest frame down to the allocating one (an "icicle"); in a process
snapshot, the open scope (and its tasks) that holds the bytes comes first.
A box's width is its estimated bytes; hovering shows the function, file and
line, bytes, share of the total and of the zoomed box, samples and the
estimate's standard error; clicking a box zooms to it, clicking the root
(or Escape) zooms back out; the search field highlights matching boxes.
"""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING, Any

from ._units import format_size

if TYPE_CHECKING:
    from ._sites import Measure, Snapshot

__all__ = ["render"]


def _tree(snapshot: Snapshot, measure: Measure) -> list[dict[str, Any]]:
    # Nodes: [name, file, line, bytes, samples, variance, children-by-key].
    root: list[Any] = ["all", "", 0, 0, 0, 0.0, {}]
    for trace in snapshot.traces:
        if measure == "live":
            size, count, var = trace.live, trace.live_samples, trace.live_variance
        else:
            size = trace.allocated
            count = trace.allocated_samples
            var = trace.allocated_variance
        if count <= 0 or size <= 0:
            continue
        path: list[tuple[str, str, int]] = []
        if trace.group:
            path.append((trace.group, "", 0))
        if trace.traceback.truncated:
            path.append(("(older frames not recorded)", "", 0))
        frames = list(trace.traceback)
        if not frames:
            path.append(("(no Python frame)", "", 0))
        path.extend((f.name or "?", f.filename, f.lineno) for f in frames)
        node = root
        node[3] += size
        node[4] += count
        node[5] += var
        for key in path:
            child = node[6].get(key)
            if child is None:
                child = node[6][key] = [key[0], key[1], key[2], 0, 0, 0.0, {}]
            child[3] += size
            child[4] += count
            child[5] += var
            node = child

    # Flat, parents before children (each child names its parent's index),
    # largest child first: stacks may be up to 1000 frames deep, deeper than
    # a recursive walk or json's encoder may nest.
    nodes: list[dict[str, Any]] = []
    pending: list[tuple[list[Any], int]] = [(root, -1)]
    while pending:
        node, parent = pending.pop()
        out: dict[str, Any] = {
            "n": node[0],
            "v": node[3],
            "c": node[4],
            "sd": round(node[5] ** 0.5),
            "u": parent,
        }
        if node[1]:
            out["f"] = node[1]
            out["l"] = node[2]
        index = len(nodes)
        nodes.append(out)
        children = sorted(node[6].values(), key=lambda c: (-c[3], c[0], c[1], c[2]))
        pending.extend((child, index) for child in reversed(children))
    return nodes


def render(
    snapshot: Snapshot, measure: Measure = "live", title: str | None = None
) -> str:
    """The page, as a string (see :meth:`Snapshot.flamegraph`)."""
    nodes = _tree(snapshot, measure)
    label = "live bytes" if measure == "live" else "allocated bytes"
    if title is None:
        title = f"memlimits_async: {label}"
    interval = snapshot.sampling_interval
    sampling = (
        "exact accounting"
        if interval <= 1
        else f"sampled, mean interval {format_size(interval)}"
    )
    subtitle = (
        f"{label}: {format_size(nodes[0]['v'])} in {nodes[0]['c']} samples "
        f"({sampling}); "
        f"{snapshot.traceback_limit} frames recorded per sample"
    )
    # "<" escaped so that no string in the data can close the script element.
    data = json.dumps(nodes, separators=(",", ":")).replace("<", "\\u003c")
    return (
        _PAGE.replace("@TITLE@", html.escape(title))
        .replace("@SUBTITLE@", html.escape(subtitle))
        .replace("@DATA@", data)
    )


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@</title>
<style>
  body { margin: 0; padding: 12px 16px; font: 13px/1.4 system-ui, sans-serif;
         color: #222; background: #fff; }
  h1 { font-size: 17px; margin: 0 0 2px; }
  #sub { color: #555; margin-bottom: 8px; }
  #bar { display: flex; gap: 10px; align-items: center; margin-bottom: 6px; }
  #bar input { font: inherit; padding: 2px 6px; width: 18em; }
  #bar button { font: inherit; }
  #info { min-height: 2.8em; padding: 4px 8px; background: #f4f4f4;
          border-radius: 4px; margin-bottom: 6px; white-space: pre-wrap;
          font-family: ui-monospace, monospace; font-size: 12px; }
  #graph { width: 100%; display: block; }
  #graph g { cursor: pointer; }
  #graph rect { stroke: #fff; stroke-width: 0.5; }
  #graph g:hover rect { stroke: #000; stroke-width: 1; }
  #graph text { font: 12px ui-monospace, monospace; fill: #111;
                pointer-events: none; }
  #graph .match rect { fill: #c353e8 !important; }
</style>
</head>
<body>
<h1>@TITLE@</h1>
<div id="sub">@SUBTITLE@</div>
<div id="bar">
  <input id="search" type="search" placeholder="highlight: function or file">
  <button id="reset" type="button">Reset zoom</button>
  <span id="matched"></span>
</div>
<div id="info">Hover over a box for its bytes; click to zoom in, click the
top row or press Escape to zoom out.</div>
<svg id="graph" xmlns="http://www.w3.org/2000/svg" role="img"></svg>
<script type="application/json" id="data">@DATA@</script>
<script>
"use strict";
(function () {
  var NS = "http://www.w3.org/2000/svg";
  var ROW = 18, CHAR = 7.3;
  var nodes = JSON.parse(document.getElementById("data").textContent);
  var root = nodes[0], depth = 1;
  nodes.forEach(function (node) {
    node.k = [];
    if (node.u < 0) { node.p = null; node.d = 0; return; }
    node.p = nodes[node.u];
    node.d = node.p.d + 1;
    node.p.k.push(node);
    depth = Math.max(depth, node.d + 1);
  });
  var svg = document.getElementById("graph");
  var info = document.getElementById("info");
  var search = document.getElementById("search");
  var matched = document.getElementById("matched");
  var zoomed = root;
  var highlight = "";


  function size(b) {
    var units = ["bytes", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.abs(b) >= 1024 && i < units.length - 1) { b /= 1024; i++; }
    if (i === 0) return b + " bytes";
    return (b >= 100 ? b.toFixed(0) : b >= 10 ? b.toFixed(1) : b.toFixed(2)) +
      " " + units[i];
  }
  function pct(part, whole) {
    return whole > 0 ? (100 * part / whole).toFixed(1) + "%" : "-";
  }
  function place(node) {
    return node.f ? short(node.f) + ":" + node.l : "";
  }
  function short(file) {
    var parts = file.split("/");
    return parts.length > 3 ? ".../" + parts.slice(-3).join("/") : file;
  }
  function label(node) {
    var where = place(node);
    return node.n + (where ? " (" + where + ")" : "");
  }
  function boxText(node) {
    // The name and the bytes first: they are what a narrow box keeps.
    if (node === root) return "all: " + size(node.v) + " (100%)";
    var text = node.n + "  " + size(node.v) + " (" + pct(node.v, root.v) + ")";
    if (node.f) text += "  " + node.f.split("/").pop() + ":" + node.l;
    return text;
  }
  function hue(node) {
    var key = node.f || node.n, h = 0;
    for (var i = 0; i < key.length; i++) h = (h * 31 + key.charCodeAt(i)) | 0;
    h = Math.abs(h);
    if (!node.f) return node.p ? "hsl(210,45%,78%)" : "hsl(0,0%,82%)";
    return "hsl(" + (10 + h % 45) + "," + (70 + h % 20) + "%," +
      (58 + (h >> 8) % 14) + "%)";
  }
  function describe(node) {
    var lines = [label(node)];
    if (node.f) lines[0] = node.n + "  " + node.f + ":" + node.l;
    var text = size(node.v) + "  " + pct(node.v, root.v) + " of all";
    if (zoomed !== root) text += ", " + pct(node.v, zoomed.v) + " of zoomed";
    text += "  (" + node.c + " samples";
    if (node.sd > 0) text += ", +-" + size(node.sd);
    text += ")";
    lines.push(text);
    return lines.join("\\n");
  }
  function inside(node, ancestor) {
    for (var n = node; n; n = n.p) if (n === ancestor) return true;
    return false;
  }
  function draw() {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var width = svg.clientWidth || document.body.clientWidth || 1000;
    svg.setAttribute("height", depth * ROW + 2);
    svg.setAttribute("viewBox", "0 0 " + width + " " + (depth * ROW + 2));
    var scale = zoomed.v > 0 ? width / zoomed.v : 0;
    var count = 0, needle = highlight.toLowerCase();
    function box(node, x, y, w, faded) {
      if (w < 0.5) return;
      var g = document.createElementNS(NS, "g");
      g.setAttribute("class", "frame");
      g.setAttribute("data-name", node.n);
      var rect = document.createElementNS(NS, "rect");
      rect.setAttribute("x", x); rect.setAttribute("y", y);
      rect.setAttribute("width", w); rect.setAttribute("height", ROW - 1);
      rect.setAttribute("fill", hue(node));
      if (faded) rect.setAttribute("fill-opacity", "0.45");
      g.appendChild(rect);
      var title = document.createElementNS(NS, "title");
      title.textContent = describe(node);
      g.appendChild(title);
      var fits = Math.floor((w - 6) / CHAR);
      if (fits >= 3) {
        var text = boxText(node);
        if (text.length > fits) text = text.slice(0, fits - 2) + "..";
        var t = document.createElementNS(NS, "text");
        t.setAttribute("x", x + 3); t.setAttribute("y", y + ROW - 5);
        t.textContent = text;
        g.appendChild(t);
      }
      if (needle && (node.n.toLowerCase().indexOf(needle) >= 0 ||
                     (node.f || "").toLowerCase().indexOf(needle) >= 0)) {
        g.classList.add("match"); count++;
      }
      g.addEventListener("mouseenter", function () {
        info.textContent = describe(node);
      });
      g.addEventListener("click", function (event) {
        event.stopPropagation();
        zoom(node === zoomed ? (node.p || root) : node);
      });
      svg.appendChild(g);
    }
    // Ancestors of the zoomed box span the whole width, faded.
    var chain = [];
    for (var n = zoomed; n; n = n.p) chain.unshift(n);
    chain.forEach(function (node) {
      box(node, 0, node.d * ROW, width, node !== zoomed);
    });
    function children(node, x) {
      var cx = x;
      node.k.forEach(function (c) {
        var w = c.v * scale;
        box(c, cx, c.d * ROW, w, false);
        children(c, cx);
        cx += w;
      });
    }
    children(zoomed, 0);
    matched.textContent = needle ? count + " boxes match" : "";
  }
  function zoom(node) {
    zoomed = node;
    info.textContent = describe(node);
    draw();
  }
  document.getElementById("reset").addEventListener("click", function () {
    zoom(root);
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape") zoom(root);
  });
  search.addEventListener("input", function () { highlight = search.value; draw(); });
  window.addEventListener("resize", draw);
  if (!root.v) {
    info.textContent = "No samples: nothing was sampled with a stack recorded " +
      "(was traceback_limit 0, or nothing allocated?).";
    info.style.color = "#a00";
  }
  draw();
})();
</script>
</body>
</html>
"""
