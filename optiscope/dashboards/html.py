"""The self-contained HTML page of the report: layout, tables, figures, and its own health check.

A `Page` collects HTML fragments and plotly figures and writes one file that opens with no
network: plotly.js is inlined once, each figure is a JSON document in a
``<script type="application/json">`` element (numpy float32/int32 arrays, which plotly encodes as
base64 typed arrays: 4 bytes a number instead of ~18 as decimal text), and one small script draws
them all. Tables and text are plain HTML, readable without JavaScript.

The page checks itself. A script at the top of ``<head>`` records every ``error`` event and
unhandled promise rejection; after the figures are drawn the page writes what happened into

``<div id="optiscope-status" hidden data-state="done" data-expected=N data-figures=N
data-rendered=M data-errors=K data-resources=R data-first-ms=F data-ms=T data-done-at=D>``

(M: figures with an SVG drawn in them; K: script errors; R: resources the page fetched, 0 for a
self-contained page; F and T: ``performance.now()``, milliseconds since the navigation started,
when the first and the last figure were drawn; D: the Unix time in milliseconds of the last), and
shows a red banner when a figure is missing or a script failed. The figures are drawn one by one
after the page has loaded; `benchmarks/browser.py` (the tests and the report benchmark) reads the
element from headless Chromium.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass

import plotly.io as pio
from plotly.offline import get_plotlyjs

__all__ = ["Page", "esc", "table"]

# Marks the inlined plotly.js, so that tests can tell the bundle from the page's own markup.
PLOTLYJS_START = "/* optiscope: plotly.js bundle */"
PLOTLYJS_END = "/* optiscope: end of plotly.js bundle */"

_CONFIG = {"displaylogo": False, "responsive": True, "showLink": False, "showSendToCloud": False,
           "toImageButtonOptions": {"format": "png", "scale": 2},
           "modeBarButtonsToRemove": ["select2d", "lasso2d"]}

_CSS = """
:root { --fg: #1f2933; --muted: #52606d; --line: #d9e2ec; --bg: #ffffff; --panel: #f5f7fa;
        --ok: #1b7f3b; --warn: #a05a00; --bad: #b42318; --link: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: var(--bg);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
             sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 1.5rem 1.25rem 4rem; }
h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
h2 { font-size: 1.3rem; margin: 2.5rem 0 .5rem; padding-bottom: .25rem;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05rem; margin: 1.5rem 0 .4rem; }
p, li { max-width: 75ch; }
a { color: var(--link); }
code { font: 0.92em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.muted { color: var(--muted); }
.note { color: var(--muted); font-size: .92rem; }
nav.toc { background: var(--panel); border: 1px solid var(--line); border-radius: 6px;
          padding: .5rem 1rem; margin: 1rem 0; }
nav.toc ul { margin: .25rem 0; padding-left: 1.2rem; columns: 2; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .92rem; }
th, td { border-bottom: 1px solid var(--line); padding: .25rem .75rem .25rem 0;
         text-align: left; vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
.cards { display: flex; flex-wrap: wrap; gap: .75rem; margin: .75rem 0; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 6px;
        padding: .5rem .9rem; min-width: 12rem; }
.card .label { color: var(--muted); font-size: .85rem; }
.card .value { font-size: 1.25rem; font-weight: 600; }
.ok { color: var(--ok); } .warn { color: var(--warn); } .bad { color: var(--bad); }
figure { margin: 1rem 0 1.5rem; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .25rem; max-width: 90ch; }
.optiscope-figure { width: 100%; }
#optiscope-banner { position: sticky; top: 0; z-index: 10; background: var(--bad); color: #fff;
                    padding: .5rem 1rem; font-weight: 600; }
"""

# Runs first: records script errors (plotly.js's own included) and failed resource loads.
_HEAD_SCRIPT = """
(function () {
  var state = window.optiscopeState = {errors: []};
  window.addEventListener("error", function (e) {
    var where = e.filename ? " (" + e.filename.split("/").pop() + ":" + e.lineno + ")" : "";
    var what = e.message || (e.target && e.target.tagName ? "failed to load a <" +
      e.target.tagName.toLowerCase() + ">" : e.type);
    state.errors.push(String(what) + where);
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    var r = e.reason;
    state.errors.push("unhandled rejection: " + String(r && r.message ? r.message : r));
  });
})();
"""

# Draws the figures one at a time in page order, yielding to the browser between two, so the
# tables and the first figures show while the rest are drawn; then reports. A heatmap trace whose
# meta says {"log10": true} holds log10 of its values in z: the hover shows 10^z, and two buttons
# switch to each row over its own median, where a spike stands out whatever the row's scale
# (meta.relative_hover, meta.relative_title). Both are computed here rather than shipped: each
# would double the size of the heatmap.
_RENDER_SCRIPT = """
(function () {
  var state = window.optiscopeState;
  var status = document.getElementById("optiscope-status");
  var config = JSON.parse(document.getElementById("optiscope-config").textContent);
  var template = JSON.parse(document.getElementById("optiscope-template").textContent);
  var divs = Array.prototype.slice.call(document.querySelectorAll(".optiscope-figure"));
  var first = null;

  function decode(z) {
    if (!z || !z.bdata) return z;
    var bytes = Uint8Array.from(atob(z.bdata), function (c) { return c.charCodeAt(0); });
    var flat = new Float32Array(bytes.buffer);
    var cols = Number(String(z.shape).split(",")[1]), rows = [];
    for (var i = 0; i < flat.length; i += cols) rows.push(Array.from(flat.subarray(i, i + cols)));
    return rows;
  }
  function pow10(rows) {
    return rows.map(function (row) {
      return row.map(function (v) { return v === null || isNaN(v) ? NaN : Math.pow(10, v); });
    });
  }
  function decades(rows, prefix) {
    var lo = Infinity, hi = -Infinity;
    rows.forEach(function (row) { row.forEach(function (v) {
      if (isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); } }); });
    var vals = [], text = [];
    for (var k = Math.floor(lo); k <= Math.ceil(hi) && vals.length < 40; k++) {
      vals.push(k);
      text.push(prefix + "1e" + k);
    }
    return [vals, text];
  }
  function unlog(figure) {
    var trace = figure.data[0];
    if (!trace || trace.type !== "heatmap" || !trace.meta || !trace.meta.log10) return;
    var z = decode(trace.z), cb = trace.colorbar || {};
    var rel = z.map(function (row) {
      var finite = row.filter(isFinite).sort(function (a, b) { return a - b; });
      var mid = finite.length ? finite[Math.floor(finite.length / 2)] : NaN;
      return row.map(function (v) { return v - mid; });
    });
    var ticks = decades(rel, "×");
    trace.z = z;
    trace.customdata = pow10(z);
    var views = [
      {label: "values", z: z, cd: trace.customdata, hover: trace.hovertemplate,
       vals: cb.tickvals, text: cb.ticktext, title: cb.title ? cb.title.text : ""},
      {label: "÷ each tensor's median", z: rel, cd: pow10(rel), hover: trace.meta.relative_hover,
       vals: ticks[0], text: ticks[1], title: trace.meta.relative_title}];
    figure.layout.updatemenus = [{
      type: "buttons", direction: "right", showactive: true, active: 0, x: 0, xanchor: "left",
      y: 1, yanchor: "bottom", pad: {t: 2, b: 4}, font: {size: 11},
      buttons: views.map(function (v) {
        return {label: v.label, method: "restyle", args: [{
          z: [v.z], customdata: [v.cd], hovertemplate: [v.hover], "colorbar.tickvals": [v.vals],
          "colorbar.ticktext": [v.text], "colorbar.title.text": [v.title]}, [0]]};
      })}];
  }
  function failed(div, e) {
    state.errors.push(div.id + ": " + (e && e.message ? e.message : e));
  }
  function draw(i) {
    if (i === divs.length) return finish();
    var div = divs[i], done = function () {
      if (first === null) first = performance.now();
      setTimeout(function () { draw(i + 1); }, 0);
    };
    try {
      var figure = JSON.parse(document.getElementById(div.id + "-data").textContent);
      figure.layout.template = template;
      unlog(figure);
      Plotly.newPlot(div, figure.data, figure.layout, config)
        .catch(function (e) { failed(div, e); }).then(done);
    } catch (e) {
      failed(div, e);
      done();
    }
  }
  function finish() {
    var rendered = divs.filter(function (d) { return d.querySelector(".main-svg"); }).length;
    var resources = performance.getEntriesByType("resource").length;
    status.dataset.figures = divs.length;
    status.dataset.rendered = rendered;
    status.dataset.errors = state.errors.length;
    status.dataset.resources = resources;
    status.dataset.ms = performance.now().toFixed(1);
    status.dataset.firstMs = first === null ? "" : first.toFixed(1);
    status.dataset.doneAt = (performance.timeOrigin + performance.now()).toFixed(0);
    status.dataset.state = "done";
    if (rendered < divs.length || state.errors.length) {
      status.textContent = state.errors.join("\\n");
      var banner = document.getElementById("optiscope-banner");
      banner.textContent = "This report did not render completely: " + rendered + " of " +
        divs.length + " figures drawn, " + state.errors.length + " script error(s)" +
        (state.errors.length ? ": " + state.errors[0] : "") + ".";
      banner.hidden = false;
    }
  }
  draw(0);
})();
"""


def esc(text: object) -> str:
    """``text`` as HTML text or attribute value: ``& < > " '`` escaped."""
    return html.escape(str(text), quote=True)


def table(header: list[str], rows: list[list[str]], *, numeric: set[int] = frozenset(),
          caption: str | None = None) -> str:
    """An HTML table from cells that are already HTML (escape text with `esc` first).

    Args:
        header: column titles (HTML).
        rows: one list of cells (HTML) per row.
        numeric: indices of right-aligned, tabular-figure columns (default none).
        caption: optional note under the table (HTML).
    """
    def cells(tag: str, row: list[str]) -> str:
        return "".join(f'<{tag}{" class=num" if i in numeric else ""}>{c}</{tag}>'
                       for i, c in enumerate(row))

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    note = f'<p class="note">{caption}</p>' if caption else ""
    return (f'<div class="scroll"><table><thead><tr>{cells("th", header)}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>{note}")


def _script_json(text: str) -> str:
    """JSON made safe inside ``<script>``: no ``</script>`` or ``<!--`` can close or confuse it.

    The escapes are JSON's own, so ``JSON.parse`` returns the same document.
    """
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclass
class _Figure:
    id: str
    json: str
    height: int


class Page:
    """One report page: HTML fragments and figures, in order.

    Args:
        title: the page title (plain text; escaped here).
    """

    def __init__(self, title: str):
        self.title = title
        self._parts: list[str | _Figure] = []
        self._count = 0

    @property
    def figures(self) -> int:
        """Figures added so far."""
        return self._count

    def html(self, fragment: str) -> None:
        """Appends an HTML fragment (already escaped)."""
        self._parts.append(fragment)

    def figure(self, fig, caption: str | None = None) -> None:
        """Appends a plotly figure and an optional caption (HTML).

        Its arrays should be numpy float32 / int32: plotly then writes them as base64 typed
        arrays. The figure's height is taken from ``fig.layout.height`` (default 360 px).
        """
        self._count += 1
        height = int(fig.layout.height or 360)
        fig.update_layout(height=height)
        self._parts.append(_Figure(f"fig-{self._count}", pio.to_json(fig, validate=False), height))
        if caption:
            self._parts.append(f"<figcaption>{caption}</figcaption>")

    def render(self, nav: list[tuple[str, str]] | None = None) -> str:
        """The whole HTML document.

        Args:
            nav: optional table of contents, ``(anchor id, text)`` pairs (text is escaped here).
        """
        body = []
        for part in self._parts:
            if isinstance(part, _Figure):
                body.append(f'<figure><div class="optiscope-figure" id="{part.id}" '
                            f'style="min-height:{part.height}px"></div>'
                            f'<script type="application/json" id="{part.id}-data">'
                            f"{_script_json(part.json)}</script></figure>")
            else:
                body.append(part)
        toc = ""
        if nav:
            items = "".join(f'<li><a href="#{esc(anchor)}">{esc(text)}</a></li>'
                            for anchor, text in nav)
            toc = f'<nav class="toc"><strong>Contents</strong><ul>{items}</ul></nav>'
        template = pio.templates["plotly_white"].to_plotly_json()
        template["layout"]["font"] = {"size": 13, "color": "#1f2933"}
        # Automatic margins draw every figure twice (measure, then lay out again), which doubles
        # the drawing time of a large heatmap. The report sets its margins from its labels instead.
        for axis in ("xaxis", "yaxis"):
            template["layout"][axis]["automargin"] = False
        return "\n".join([
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{esc(self.title)}</title>",
            f"<style>{_CSS}</style>",
            f"<script>{_HEAD_SCRIPT}</script>",
            f"<script>{PLOTLYJS_START}\n{get_plotlyjs()}\n{PLOTLYJS_END}</script>",
            "</head><body>",
            f'<div id="optiscope-status" hidden data-state="loading" '
            f'data-expected="{self._count}"></div>',
            '<div id="optiscope-banner" hidden></div>',
            '<noscript><p style="background:#fff3cd;padding:.5rem 1rem;margin:0">'
            "The figures need JavaScript; the tables below read without it.</p></noscript>",
            f"<main><h1>{esc(self.title)}</h1>{toc}",
            *body,
            "</main>",
            f'<script type="application/json" id="optiscope-config">'
            f"{_script_json(json.dumps(_CONFIG))}</script>",
            f'<script type="application/json" id="optiscope-template">'
            f"{_script_json(json.dumps(template))}</script>",
            f"<script>{_RENDER_SCRIPT}</script>",
            "</body></html>",
        ])
