"""A generation viewer: one self-contained HTML page that animates a sampling trajectory
(layer 5; ``tdlm sample --html``).

The page holds its data (the trajectory's token ids per step and sample, the text of every
token id that occurs, the labels of the states that are not tokens, the final samples) as
JSON in the page itself, with inline CSS and JavaScript: no network, no build step, any
browser. A step slider, play/pause, first/last and a sample chooser; what changed since the
previous step is highlighted:

* MDLM: [MASK] positions (grey) are unmasked step by step;
* TDLM: a position at a tree node shows the cluster as its most frequent member tokens
  (``{the|a|an}``, coloured by height), refined level by level from the root (coarse to fine);
* DID: tokens are inserted into the growing text.

The last frame shows the final samples' text exactly (``samples.jsonl``'s ``text``).
Test hooks: the URL fragment ``#frame=N`` (or ``last``), ``&sample=i`` and ``&play`` choose
the first view; ``<body>`` carries ``data-frame``, ``data-frames``, ``data-sample`` and
``data-playing``; console errors and uncaught exceptions are collected in
``<html data-errors>``.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Optional, Sequence

from .utils.io import atomic_write_text


def viewer_data(records: Sequence[dict], trajectory: Sequence[dict], meta: dict, tokenizer,
                labels: Optional[dict] = None) -> dict:
    """What the page shows: ``frames`` (one per trajectory record: step, t, phase and the
    ids of every sample), ``pieces`` (id -> text of every token that occurs), ``labels``
    (states that are not tokens, from ``Family.state_labels``) and the ``final`` samples
    (text, ids, and whether the token texts joined give the text exactly)."""
    labels = {int(k): v for k, v in (labels or {}).items()}
    frames = []
    for rec in trajectory:
        frames.append({"step": rec.get("step"), "t": rec.get("t"), "phase": rec.get("phase"),
                       "initial": bool(rec.get("initial")),
                       "noise_removal": bool(rec.get("noise_removal")),
                       "ids": [list(map(int, x)) for x in rec["ids"]]})
    final_ids = [list(map(int, r["ids"])) for r in records]
    if not frames or [list(x) for x in frames[-1]["ids"]] != final_ids:
        frames.append({"step": None, "t": None, "phase": None, "initial": False,
                       "noise_removal": False, "ids": final_ids, "final": True})
    seen = {i for f in frames for x in f["ids"] for i in x} | {i for x in final_ids for i in x}
    pieces = {i: tokenizer.decode([i]) for i in sorted(seen) if i not in labels}
    final = [{"text": r["text"], "ids": ids,
              "exact": "".join(pieces.get(i, "") for i in ids) == r["text"]}
             for r, ids in zip(records, final_ids)]
    keep = {"family", "num", "steps", "seed", "temperature", "top_p", "checkpoint", "prompt",
            "steps_split_root_to_leaf", "tree_K", "tree_H"}
    special = sorted({int(i) for i in (getattr(tokenizer, n, None)
                                       for n in ("bos_id", "eos_id", "pad_id"))
                      if isinstance(i, int) and i in pieces})
    return {"meta": {k: meta[k] for k in sorted(keep) if k in meta},
            "frames": frames, "pieces": {str(k): v for k, v in pieces.items()},
            "labels": {str(k): v for k, v in labels.items()}, "special": special,
            "final": final}


def render_page(data: dict) -> str:
    """The page (a string) for :func:`viewer_data`'s ``data``."""
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    m = data["meta"]
    title = f"tdlm · {m.get('family', '?')} sampling · {m.get('steps', '?')} steps"
    return (_PAGE.replace("__TITLE__", html.escape(title))
            .replace("__DATA__", blob).replace("__SCRIPT__", _SCRIPT))


def write_viewer(path, records, trajectory, meta, tokenizer,
                 labels: Optional[dict] = None) -> Path:
    """Write the page to ``path`` (atomically); returns the path."""
    path = Path(path)
    atomic_write_text(path, render_page(viewer_data(records, trajectory, meta, tokenizer,
                                                    labels)))
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<script>
(function () {
  var root = document.documentElement;
  function note(msg) { root.setAttribute("data-errors", (root.getAttribute("data-errors") || "") + msg + "\\n"); }
  window.addEventListener("error", function (e) { note("error: " + e.message); });
  window.addEventListener("unhandledrejection", function (e) { note("rejection: " + e.reason); });
  var err = console.error, warn = console.warn;
  console.error = function () { note("console.error: " + Array.prototype.join.call(arguments, " ")); err.apply(console, arguments); };
  console.warn = function () { note("console.warn: " + Array.prototype.join.call(arguments, " ")); warn.apply(console, arguments); };
})();
</script>
<style>
  :root { --bg: #fbfbf8; --fg: #1d1d1b; --mute: #8a8a84; --new: #ffe28a; --mask: #d9d9d4; }
  body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
         background: var(--bg); color: var(--fg); }
  header { padding: 14px 22px 6px; border-bottom: 1px solid #e4e4de; }
  h1 { font-size: 17px; margin: 0 0 4px; font-weight: 600; }
  #meta { color: var(--mute); font-size: 13px; }
  #controls { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; padding: 10px 22px; }
  #controls button { font: inherit; padding: 3px 11px; border: 1px solid #bbb; border-radius: 5px;
                     background: #fff; cursor: pointer; min-width: 58px; }
  #step { flex: 1 1 320px; }
  #info { font-variant-numeric: tabular-nums; color: #444; min-width: 300px; font-size: 13px; }
  #text { margin: 4px 22px 12px; padding: 14px 16px; background: #fff; border: 1px solid #e4e4de;
          border-radius: 8px; white-space: pre-wrap; word-break: break-word;
          font: 15px/1.9 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; min-height: 120px; }
  .tok.new { background: var(--new); border-radius: 3px; }
  .tok.special { color: #a0a09a; font-size: 12px; }
  .mask { color: #b4b4ad; background: var(--mask); border-radius: 2px; margin: 0 1px; }
  .node { border-radius: 4px; padding: 0 3px; margin: 0 1px; font-size: 12px; color: #1e3a5f; }
  .node.new { outline: 2px solid #e0b400; }
  .h1 { background: #d7ecff; } .h2 { background: #e4dcff; color: #3b2a6b; }
  .h3 { background: #ffe0ec; color: #6b2a45; } .h4 { background: #dff5e3; color: #22502c; }
  .root { background: var(--mask); color: #9a9a93; }
  #legend { padding: 0 22px 18px; color: var(--mute); font-size: 13px; }
  #legend span { margin-right: 14px; }
</style>
</head>
<body>
<header><h1>__TITLE__</h1><div id="meta"></div></header>
<div id="controls">
  <button id="first" title="first step (Home)">first</button>
  <button id="play" title="play / pause (space)">play</button>
  <button id="last" title="last step (End)">last</button>
  <input id="step" type="range" min="0" max="0" value="0" aria-label="step">
  <select id="speed" aria-label="speed"><option value="400">slow</option>
    <option value="120" selected>normal</option><option value="30">fast</option></select>
  <select id="sample" aria-label="sample"></select>
  <span id="info"></span>
</div>
<div id="text"></div>
<div id="legend"></div>
<script type="application/json" id="data">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("data").textContent);
  var frames = D.frames, pieces = D.pieces, labels = D.labels, finals = D.final;
  var special = {};
  (D.special || []).forEach(function (i) { special[i] = true; });
  var el = function (id) { return document.getElementById(id); };
  var slider = el("step"), text = el("text"), info = el("info"), playBtn = el("play");
  var state = { frame: 0, sample: 0, timer: null };

  function sameIds(a, b) {
    if (a.length !== b.length) return false;
    for (var i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
    return true;
  }
  // positions of cur that are new relative to prev: position-wise when the length is the
  // same (MDLM, TDLM), else prev as a subsequence of cur (DID insertions)
  function changed(prev, cur) {
    var out = new Array(cur.length).fill(false);
    if (!prev) return out;
    if (prev.length === cur.length) {
      for (var i = 0; i < cur.length; i++) out[i] = prev[i] !== cur[i];
      return out;
    }
    var j = 0;
    for (var k = 0; k < cur.length; k++) {
      if (j < prev.length && prev[j] === cur[k]) { j++; } else { out[k] = true; }
    }
    return out;
  }
  function span(cls, txt, title) {
    var s = document.createElement("span");
    s.className = cls;
    s.textContent = txt;
    if (title) s.title = title;
    return s;
  }
  function render() {
    var f = frames[state.frame], ids = f.ids[state.sample];
    var prev = state.frame > 0 ? frames[state.frame - 1].ids[state.sample] : null;
    var fin = finals[state.sample];
    var isLast = state.frame === frames.length - 1;
    text.textContent = "";
    var nNew = 0, nStates = 0;
    if (isLast && !fin.exact && sameIds(ids, fin.ids)) {
      text.appendChild(span("tok", fin.text));          // exact final text
    } else {
      var ch = changed(prev, ids);
      var frag = document.createDocumentFragment();
      for (var i = 0; i < ids.length; i++) {
        var id = ids[i], lab = labels[id], cls = ch[i] ? " new" : "";
        if (ch[i]) nNew++;
        if (lab === undefined) {
          frag.appendChild(span("tok" + (special[id] ? " special" : "") + cls,
                                pieces[id] !== undefined ? pieces[id] : ""));
        } else if (lab.kind === "mask" || lab.kind === "root") {
          nStates++;
          frag.appendChild(span(lab.kind + cls, "\u2591", lab.kind === "root" ? "root (any token)" : "[MASK]"));
        } else {
          nStates++;
          frag.appendChild(span("node h" + lab.height + cls, "{" + lab.label + "}",
                                "cluster of " + lab.size + " tokens at height " + lab.height +
                                "; most frequent: " + lab.members.join(" \u00b7 ")));
        }
      }
      text.appendChild(frag);
    }
    var parts = [];
    parts.push(f.initial ? "start" : (f.noise_removal ? "noise removal" :
               (f.final ? "final" : "step " + (f.step + 1) + " / " + (D.meta.steps || "?"))));
    // the sampler's time value: global t (MDLM, DID), TDLM's local time u in the level window
    if (typeof f.t === "number") parts.push((D.meta.tree_H ? "u = " : "t = ") + f.t.toFixed(3));
    if (D.meta.tree_H && typeof f.phase === "number") parts.push("level " + f.phase);
    parts.push(ids.length + " tokens");
    if (nStates) parts.push(nStates + " undecided");
    if (prev) parts.push(nNew + " changed");
    info.textContent = parts.join(" \u00b7 ");
    slider.value = String(state.frame);
    document.body.setAttribute("data-frame", String(state.frame));
    document.body.setAttribute("data-sample", String(state.sample));
  }
  function setPlaying(on) {
    if (state.timer) { clearInterval(state.timer); state.timer = null; }
    if (on) {
      if (state.frame >= frames.length - 1) { state.frame = 0; render(); }
      state.timer = setInterval(function () {
        if (state.frame >= frames.length - 1) { setPlaying(false); return; }
        state.frame++; render();
      }, parseInt(el("speed").value, 10));
    }
    playBtn.textContent = on ? "pause" : "play";
    document.body.setAttribute("data-playing", on ? "1" : "0");
  }
  function go(f) { setPlaying(false); state.frame = Math.max(0, Math.min(frames.length - 1, f)); render(); }

  slider.max = String(frames.length - 1);
  document.body.setAttribute("data-frames", String(frames.length));
  var sel = el("sample");
  for (var s = 0; s < finals.length; s++) {
    var o = document.createElement("option");
    o.value = String(s); o.textContent = "sample " + s;
    sel.appendChild(o);
  }
  var m = D.meta, desc = [m.family, m.steps + " steps", "seed " + m.seed];
  if (m.tree_K) desc.push("tree K=" + m.tree_K + ", H=" + m.tree_H);
  if (m.temperature !== undefined && m.temperature !== 1) desc.push("temperature " + m.temperature);
  if (m.top_p !== undefined && m.top_p !== 1) desc.push("top-p " + m.top_p);
  if (m.checkpoint) desc.push(m.checkpoint);
  el("meta").textContent = desc.join(" \u00b7 ");
  var kinds = {};
  Object.keys(labels).forEach(function (k) { kinds[labels[k].kind] = true; });
  var leg = el("legend");
  leg.appendChild(span("tok new", "changed at this step"));
  if (kinds.mask) leg.appendChild(span("mask", "\u2591 [MASK]"));
  if (kinds.root) leg.appendChild(span("root", "\u2591 root"));
  if (kinds.node) leg.appendChild(span("node h1", "{a|b|c} cluster: its most frequent tokens (colour: height)"));

  slider.addEventListener("input", function () { go(parseInt(slider.value, 10)); });
  el("first").addEventListener("click", function () { go(0); });
  el("last").addEventListener("click", function () { go(frames.length - 1); });
  playBtn.addEventListener("click", function () { setPlaying(!state.timer); });
  sel.addEventListener("change", function () { state.sample = parseInt(sel.value, 10); render(); });
  document.addEventListener("keydown", function (e) {
    if (e.target && e.target.tagName === "SELECT") return;
    if (e.key === "ArrowRight") go(state.frame + 1);
    else if (e.key === "ArrowLeft") go(state.frame - 1);
    else if (e.key === "Home") go(0);
    else if (e.key === "End") go(frames.length - 1);
    else if (e.key === " ") { e.preventDefault(); setPlaying(!state.timer); }
  });

  // first view from the URL fragment: #frame=N|last&sample=i&play
  var h = {};
  location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
    if (!kv) return;
    var p = kv.split("=");
    h[decodeURIComponent(p[0])] = p.length > 1 ? decodeURIComponent(p[1]) : "";
  });
  if (h.sample !== undefined) state.sample = Math.max(0, Math.min(finals.length - 1, parseInt(h.sample, 10) || 0));
  sel.value = String(state.sample);
  if (h.frame === "last") state.frame = frames.length - 1;
  else if (h.frame !== undefined) state.frame = Math.max(0, Math.min(frames.length - 1, parseInt(h.frame, 10) || 0));
  render();
  setPlaying("play" in h);
})();
"""
