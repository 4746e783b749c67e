"""Plots of a report as PNGs: a run report's panel, a metric (or a few) against the step (one run: a colour per
metric; several runs: a colour per run, a line style per metric), held-out `eval_` values as dashed lines with
markers, and a standard-deviation band where the panel has one; and, for other reports (`posttrain diagnose`),
bars with interval error bars (`render_bars`) and lines over any x (`render_lines`).

matplotlib is imported here and only here, through its object API (`Figure`, Agg): no pyplot, no global state,
no display needed, and `import posttrain` does not pay for it.
"""

from __future__ import annotations

import io

WIDTH_IN, HEIGHT_IN, DPI = 5.6, 3.3, 100  # 560 x 330 pixels: two panels side by side on a 1200-pixel page
STYLES = ("-", "--", ":", "-.")
MARKERS_UP_TO = 30  # points: fewer than this and each is marked (a short run's few steps stay visible)


def render_panel(panel, runs) -> tuple[bytes, int, int]:
    """PNG bytes, width and height (pixels) of `panel` (a `catalogue.Panel`) drawn for every run that has its keys."""
    fig, ax = _figure()
    several = len(runs) > 1
    drawn = 0
    for i, run in enumerate(runs):
        for j, key in enumerate(panel.keys):
            steps, values = run.series(key)
            if not steps:
                continue
            held_out = key.startswith("eval_")
            # one run: a colour per metric; several: a colour per run and a line style per metric
            colour = f"C{(i if several else j) % 10}"
            label = _label(key, run.label, several_runs=several, several_keys=len(panel.keys) > 1)
            ax.plot(steps, values, color=colour, label=label,
                    linestyle="--" if held_out else STYLES[j % len(STYLES)] if several else "-",
                    marker="o" if held_out or len(steps) <= MARKERS_UP_TO else None, markersize=3.5,
                    linewidth=1.6)  # fmt: skip
            drawn += 1
            band = panel.band.get(key)
            if band:
                std = dict(zip(*run.series(band)))
                lo = [v - std.get(s, 0.0) for s, v in zip(steps, values)]
                hi = [v + std.get(s, 0.0) for s, v in zip(steps, values)]
                ax.fill_between(steps, lo, hi, color=colour, alpha=0.15, linewidth=0)
    _axes(ax, panel.title, "step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if panel.from_zero:  # a 3 MB rise on a 0.51 GB process, auto-scaled, read as a leak (an audit)
        ax.set_ylim(bottom=0)
    if drawn > 1 or (drawn and several):  # several runs: always say which line is which
        ax.legend(fontsize=7.5, loc="best", framealpha=0.8)
    return _png(fig)


def render_bars(title: str, labels: list[str], values: list[float], lows: list[float], highs: list[float], *,
                ylabel: str = "") -> tuple[bytes, int, int]:  # fmt: skip
    """PNG bytes, width and height of one bar per label at `values`, each with an error bar from `lows` to `highs`
    (an interval, e.g. a bootstrap 95% interval; need not be symmetric), and a line at 0."""
    fig, ax = _figure()
    x = list(range(len(labels)))
    below = [max(v - lo, 0.0) for v, lo in zip(values, lows)]
    above = [max(hi - v, 0.0) for v, hi in zip(values, highs)]
    ax.bar(x, values, color=[f"C{i % 10}" for i in x], width=0.6, yerr=[below, above], capsize=5,
           error_kw={"elinewidth": 1.2, "ecolor": "#333333"})  # fmt: skip
    ax.axhline(0, color="#333333", linewidth=0.8)
    ax.set_xticks(x, labels)
    ax.set_ylabel(ylabel, fontsize=9)
    _axes(ax, title, "")
    return _png(fig)


def render_lines(title: str, x: list[float] | dict[str, list[float]], series: dict[str, list[float]], *,
                 xlabel: str, ylabel: str = "", integer_x: bool = True) -> tuple[bytes, int, int]:  # fmt: skip
    """PNG bytes, width and height of one marked line per named series over `x` (a legend when there are several);
    `x` is shared, or a dict giving each series its own (e.g. the seconds at which each arm was measured)."""
    fig, ax = _figure()
    for i, (label, ys) in enumerate(series.items()):
        xs = x[label] if isinstance(x, dict) else x
        ax.plot(xs, ys, color=f"C{i % 10}", label=label, marker="o", markersize=3.5, linewidth=1.6)
    ax.set_ylabel(ylabel, fontsize=9)
    _axes(ax, title, xlabel)
    if integer_x:
        ax.xaxis.get_major_locator().set_params(integer=True)
    if len(series) > 1:
        ax.legend(fontsize=7.5, loc="best", framealpha=0.8)
    return _png(fig)


def _figure():
    """A figure of the report's size with one axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    # fixed margins rather than a layout engine: the same room for every panel, at 60% of the drawing time
    fig.subplots_adjust(left=0.13, right=0.97, top=0.9, bottom=0.15)
    return fig, fig.add_subplot()


def _axes(ax, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def _png(fig) -> tuple[bytes, int, int]:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue(), round(WIDTH_IN * DPI), round(HEIGHT_IN * DPI)


def _label(key: str, run: str, *, several_runs: bool, several_keys: bool) -> str:
    """A legend entry: the metric, the run, or both (only what tells the lines apart, plus "held-out").

    >>> _label("eval_loss", "a", several_runs=False, several_keys=True), _label("lr", "a", several_runs=True, several_keys=False)
    ('eval_loss (held-out)', 'a')
    """
    name = f"{key} (held-out)" if key.startswith("eval_") else key
    if several_runs and several_keys:
        return f"{run}: {name}"
    return run if several_runs else name
