"""``layers.png``: each layer's quantizer-input distribution against its range, SQNR and clipping."""
import math


def _normalised(v, lower, upper):
    return (v - lower) / (upper - lower)


def draw_figure(path, rows, title):
    """Two panels: each layer's quantizer-input distribution in units of its range (0 = lower, 1 = upper), and
    input / weight SQNR with the clipped fraction."""
    import matplotlib

    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(rows)
    width = min(max(8.0, 2.5 + 0.42 * n), 40.0)
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(width, 9.0), sharex=True, gridspec_kw={'height_ratios': [3, 2]},
                                 layout='constrained')
    xs = np.arange(n)
    ax.axhspan(0.0, 1.0, color='tab:red', alpha=0.08, zorder=0)
    ax.axhline(0.0, color='tab:red', lw=1.2, zorder=1)
    ax.axhline(1.0, color='tab:red', lw=1.2, zorder=1, label='quantizer range [lower, upper]')
    lo_view, hi_view = -0.25, 1.25
    boxes = []
    for i, r in enumerate(rows):
        if r.get('lower') is None or r['calls'] == 0:
            continue
        src = r.get('quantizer_input', r)
        p = src['percentiles']
        vals = [_normalised(v, r['lower'], r['upper'])
                for v in (src['min'], p['p0.1'], p['p1'], p['p50'], p['p99'], p['p99.9'], src['max'])]
        boxes.append((i, vals))
        lo_view, hi_view = min(lo_view, vals[1]), max(hi_view, vals[5])
    span = hi_view - lo_view
    lo_view, hi_view = max(lo_view - 0.05 * span, -3.0), min(hi_view + 0.05 * span, 4.0)
    for i, (mn, p01, p1, p50, p99, p999, mx) in boxes:
        ax.plot([i, i], [p01, p999], color='tab:blue', lw=1.2, zorder=2)
        ax.add_patch(plt.Rectangle((i - 0.28, p1), 0.56, max(p99 - p1, 1e-9), facecolor='tab:blue', alpha=0.45,
                                   edgecolor='tab:blue', zorder=3))
        ax.plot([i - 0.28, i + 0.28], [p50, p50], color='black', lw=1.5, zorder=4)
        for v, marker in ((mn, 'v'), (mx, '^')):
            inside = lo_view <= v <= hi_view
            ax.plot(i, min(max(v, lo_view), hi_view), marker=marker, ms=5 if inside else 7, clip_on=False,
                    color='tab:blue' if inside else 'tab:purple', zorder=5, linestyle='none')
    ax.set_ylim(lo_view, hi_view)
    ax.set_ylabel('(x - lower) / (upper - lower)')
    fig.suptitle(title, fontsize=10)
    ax.plot([], [], color='tab:blue', lw=6, alpha=0.45, label='FP input: p1-p99 (box), p0.1-p99.9 (whisker), p50')
    ax.plot([], [], 'v', color='tab:blue', label='min / max')
    ax.plot([], [], '^', color='tab:purple', label='min / max out of view (at the edge)')
    ax.legend(loc='lower left', bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis='y', alpha=0.3)

    def series(key):
        return np.array([np.nan if not isinstance(r.get(key), (int, float)) or not math.isfinite(r[key])
                         else r[key] for r in rows], dtype=float)

    bx.plot(xs, series('input_sqnr_db'), 'o-', color='tab:blue', label='input SQNR (dB)')
    bx.plot(xs, series('weight_sqnr_db'), 's-', color='tab:orange', label='weight SQNR (dB)')
    bx.set_ylabel('SQNR (dB)')
    bx.grid(axis='y', alpha=0.3)
    cx = bx.twinx()
    clipped = series('clipped') * 100.0
    low = np.nan_to_num(series('clipped_low') * 100.0)
    cx.bar(xs, low, width=0.5, color='tab:gray', alpha=0.55, label='clipped below lower (%)')
    cx.bar(xs, np.nan_to_num(series('clipped_high') * 100.0), width=0.5, bottom=low, color='tab:gray', alpha=0.25,
           hatch='//', label='clipped above upper (%)')
    cx.set_ylabel('clipped (% of input values)')
    cx.set_ylim(0, max(1.0, float(np.nanmax(clipped)) * 1.15) if np.isfinite(clipped).any() else 1.0)
    handles = bx.get_legend_handles_labels()[0] + cx.get_legend_handles_labels()[0]
    labels = bx.get_legend_handles_labels()[1] + cx.get_legend_handles_labels()[1]
    bx.legend(handles, labels, loc='lower left', bbox_to_anchor=(0.0, 1.0), ncol=4, fontsize=8, frameon=False)
    bx.set_zorder(cx.get_zorder() + 1)
    bx.patch.set_visible(False)
    ticks = [f'{r["layer"]}{" *" if r.get("offset") else ""}' for r in rows]
    bx.set_xticks(xs)
    bx.set_xticklabels(ticks, rotation=90, fontsize=8 if n <= 40 else 6)
    bx.set_xlim(-0.6, n - 0.4)
    bx.set_xlabel('quantized layer, forward order' + ('  (* offset: distribution of x - delta or x / rho)'
                                                      if any(r.get('offset') for r in rows) else ''))
    fig.savefig(path, dpi=100)
    plt.close(fig)
