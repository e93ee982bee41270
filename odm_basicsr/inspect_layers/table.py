"""The per-layer statistics as a Markdown table (``layers.md``) and as JSON-safe values (``layers.json``)."""
import math


def _num(v, digits=4):
    if v is None:
        return '-'
    if isinstance(v, float) and math.isinf(v):
        return 'inf'
    if v == 0:
        return '0'
    a = abs(v)
    if 1e-3 <= a < 1e5:
        return f'{v:.{digits}g}'
    return f'{v:.3e}'


def _pct(v):
    return '-' if v is None else f'{100 * v:.3f}'


def _clip_cell(r):
    if r.get('clipped') is None:
        return '-'
    return f'{_pct(r["clipped"])} ({100 * r["clipped_low"]:.2f} / {100 * r["clipped_high"]:.2f})'


def format_markdown(rows):
    head = ['#', 'layer', 'bits', 'offset', 'min', 'p0.1', 'p1', 'p50', 'p99', 'p99.9', 'max', 'lower', 'upper',
            'clipped % (low / high)', 'in SQNR dB', 'W SQNR dB', 'shift', 'scale', 'variance']
    align = ['---:', '---', '---', '---'] + ['---:'] * (len(head) - 4)
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(align) + '|']
    for i, r in enumerate(rows):
        bits = f'W{r["w_bits"]}A{r["a_bits"]}'.replace('32', 'FP')
        if r['calls'] == 0:
            lines.append(f'| {i} | {r["layer"]} | {bits} | {r["offset"] or ""} | ' + ' | '.join(['-'] * 15)
                         + ' |')
            continue
        p = r['percentiles']
        cells = [str(i), r['layer'], bits, r['offset'] or '', _num(r['min']), _num(p['p0.1']), _num(p['p1']),
                 _num(p['p50']), _num(p['p99']), _num(p['p99.9']), _num(r['max']), _num(r['lower']),
                 _num(r['upper']), _clip_cell(r), _num(r['input_sqnr_db'], 3), _num(r['weight_sqnr_db'], 3),
                 _num(r['mismatch_shift'], 3), _num(r['mismatch_scale'], 3), _num(r['variance'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return 'inf' if v > 0 else ('-inf' if v < 0 else None)
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v
