"""The text form of a cost report (``odm-cost`` without ``--json``)."""


def fmt_ops(n):
    for unit, div in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= div:
            return f'{n / div:.3f} {unit}'
    return f'{n:g}'


def fmt_bytes(n):
    if n >= 1e6:
        return f'{n / 1e6:.3f} MB'
    if n >= 1e3:
        return f'{n / 1e3:.3f} kB'
    return f'{n} B'


def _fmt_bits(w, a):
    return f'W{w}A{a}' if not isinstance(w, list) and not isinstance(a, list) else f'W{w} A{a} (mixed)'


def _short_list(names, limit=6):
    if len(names) <= limit:
        return ', '.join(names)
    return ', '.join(names[:limit - 2]) + f', ... ({len(names) - limit + 1} more), ' + names[-1]


def format_report(r, per_layer=False):
    """Human-readable text of a :func:`cost_report` dict."""
    w, h = r['output_size']
    lw, lh = r['input_size']
    how = ('counted on the meta device: exact shapes, no arithmetic' if r['method'] == 'meta'
           else 'counted with a reduced CPU forward pass, scaled')
    pct = 100.0 * r['quantized_fraction']
    b = r['storage']
    if r['num_quantized_layers']:
        split = (f"{fmt_ops(r['macs_quantized'])} ({pct:.1f} %) in {r['num_quantized_layers']} quantized layers, "
                 f"{fmt_ops(r['macs_fp'])} FP")
        bits = _fmt_bits(r['w_bits'], r['a_bits'])
    else:
        split, bits = 'all FP (no quantized layer)', 'no quantized layer'
    lines = [
        f"{r['arch']} x{r['scale']}: LR {lw}x{lh} -> SR {w}x{h} ({how})",
        f"MACs          {fmt_ops(r['macs'])}  ({r['macs']:,}): {split}",
    ]
    if r['macs_matmul']:
        lines.append(f"              of which {fmt_ops(r['macs_matmul'])} in matrix products outside conv/linear "
                     f"layers (e.g. attention q@k^T, attn@v), counted as FP")
    lines += [
        f"BitOPs        {fmt_ops(r['bitops'])}  = FP MACs + (b_w/32)(b_a/32) x quantized MACs "
        f"({bits}); all-FP {fmt_ops(r['bitops_fp'])}; "
        f"ratio {100.0 * r['bitops_ratio']:.1f} %",
        f"Parameters    {r['params']:,} ({r['params'] / 1e6:.3f} M); quantizer parameters {r['params_quantizer']:,}, "
        f"offset parameters {r['params_offset']:,}",
        f"Size          {fmt_bytes(r['size_bytes'])} ({r['size_bytes']:,} B): packed quantized weights "
        f"{fmt_bytes(b['quantized_weights'])}, FP32 parameters {fmt_bytes(b['fp_params'])}, FP32 buffers "
        f"{fmt_bytes(b['fp_buffers'])}, quantizer state {fmt_bytes(b['quantizer'])} "
        f"({b['quantizer_elements']} values), offsets {fmt_bytes(b['offsets'])}, weight step sizes "
        f"{fmt_bytes(b['weight_scales'])}",
        f"Size FP32     {fmt_bytes(r['size_bytes_fp'])} ({r['size_bytes_fp']:,} B); ratio "
        f"{100.0 * r['size_ratio']:.1f} %  (MB = 1e6 bytes)",
        f"Quantized layers ({r['num_quantized_layers']}): {_short_list(r['quantized_layers']) or 'none'}",
    ]
    off = r['offsets']
    if off['layers']:
        folded = sum(1 for o in off['layers'] if o['folded'])
        lines.append(f"Offsets       {len(off['layers'])} layers ({folded} folded): {off['params']:,} parameters, "
                     f"{fmt_ops(off['fp_ops'])} extra FP operations (not in the BitOPs above)")
    else:
        lines.append('Offsets       none')
    lines.append('Not counted:  ' + ', '.join(r['not_counted']))
    lines += [f'Note:         {n}' for n in r['notes']]
    if per_layer:
        lines.append(f"{'layer':<48} {'op':<10} {'MACs':>14} {'share':>7} {'bits':>7} {'BitOPs':>14}")
        for ly in r['layers']:
            share = 100.0 * ly['macs'] / r['macs'] if r['macs'] else 0.0
            bits = f"W{ly['w_bits']}A{ly['a_bits']}" if ly['quantized'] else 'FP'
            lines.append(f"{ly['name'] or '(root)':<48} {ly['op']:<10} {fmt_ops(ly['macs']):>14} {share:6.2f}% "
                         f"{bits:>7} {fmt_ops(ly['bitops']):>14}")
    return '\n'.join(lines)

