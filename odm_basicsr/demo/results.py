"""The demo's results table (console and ``results.md``)."""
from odm_basicsr.study.results import fmt_time

from .recipe import BATCH, FP_LR, LR_PATCH, OFFSETS, QAT_LR, SEED, VAL_SIZE


def table_rows(results):
    """Rows ``(method, bits, psnr, ssim, dpsnr, dssim, time)`` as strings; differences to the same-bit baseline."""
    rows = []
    base = {r['bits']: r for r in results['stages'] if r['method'] == 'baseline'}
    b = results['bicubic']
    rows.append(('bicubic', '-', f'{b["psnr"]:.2f}', f'{b["ssim"]:.4f}', '', '', '-'))
    for r in results['stages']:
        d_psnr = d_ssim = ''
        ref = base.get(r['bits'])
        if r['method'] not in ('fp', 'baseline') and ref is not None:
            d_psnr, d_ssim = f'{r["psnr"] - ref["psnr"]:+.2f}', f'{r["ssim"] - ref["ssim"]:+.4f}'
        bits = 'FP32' if r['method'] == 'fp' else f'W{r["bits"]}A{r["bits"]}'
        method = 'fp (pretrained)' if r.get('pretrained') else r['method']
        rows.append((method, bits, f'{r["psnr"]:.2f}', f'{r["ssim"]:.4f}', d_psnr, d_ssim,
                     fmt_time(r.get('train_wall_s'))))
    return rows


HEADER = ('method', 'bits', 'PSNR (dB)', 'SSIM', 'dPSNR vs baseline', 'dSSIM vs baseline', 'train time')


def format_table(results):
    rows = [HEADER] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ['  '.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, '-' * len(lines[0]))
    return '\n'.join(lines)


def _network_text(s):
    """The network / recipe sentence of results.md."""
    p = s.get('pretrained')
    if p:
        entry = f'[{p["param_key"]}]' if p['param_key'] else '(plain state dict)'
        text = (f'Pretrained FP {p["network"]} (`{p["options"]}`, weights `{p["checkpoint"]}` {entry}), '
                f'x{s["scale"]}, not trained here; training data: {s["data"]}; each QAT stage {s["qat_iters"]} '
                f'iterations (lr {QAT_LR:g}) from these weights')
    else:
        text = (f'EDSR {s["num_feat"]} channels x {s["num_block"]} blocks, x{s["scale"]}; training data: '
                f'{s["data"]}; FP {s["fp_iters"]} iterations (lr {FP_LR:g}), each QAT stage {s["qat_iters"]} '
                f'iterations (lr {QAT_LR:g}) from the FP checkpoint')
    text += f', batch {BATCH}, LR patch {LR_PATCH}, seed {SEED}. '
    layers = s.get('layers', 'default')
    if layers != 'default':
        text += f'Quantized layers: {layers if isinstance(layers, str) else ", ".join(layers)}. '
    return text


def format_markdown(results):
    s = results['settings']
    lines = ['# odm-demo results', '',
             f'Command: `{results["command"]}`  ',
             f'Date: {results["date"]}  ',
             f'Machine: {results["machine"]["summary"]}; load average (1/5/15 min) at start '
             f'{results["machine"]["load_average_at_start"]}, at end {results["machine"]["load_average_at_end"]}  ',
             f'Wall time of this invocation: {fmt_time(results["total_wall_s"])} (m:ss)'
             + (f'; {len(results["reused_stages"])} stage(s) reused from an earlier run of the same study '
                f'({", ".join(results["reused_stages"])}), their train times are from that run' if
                results['reused_stages'] else '') + '  ',
             f'Sum of the stage train times: {fmt_time(results["train_wall_s_sum"])} (m:ss)', '',
             _network_text(s) + f'ODM: FeatureVarianceLoss (channel) weight {s["var_weight"]:g}, cooperation '
             f'feature, offsets top {OFFSETS["fraction"]:.0%} of the quantized layers.', '',
             f'Evaluation: embedded val photos (chelsea, rocket; centre {VAL_SIZE} px), Y channel, border = scale, '
             "BasicSR's calculate_psnr / calculate_ssim on 8-bit images (mean over the photos). Train time = wall "
             'time of the stage (process start, calibration and validation included).', '',
             '| ' + ' | '.join(HEADER) + ' |', '|' + '---|' * len(HEADER)]
    lines += ['| ' + ' | '.join(c or ' ' for c in row) + ' |' for row in table_rows(results)]
    if s.get('pretrained'):
        start = (f'The QAT stages fine-tune the pretrained network {s["qat_iters"]} iterations on the training data '
                 'above (not its own training data): the FP row is their starting point. ')
    else:
        start = (f'The QAT stages train the network {s["qat_iters"]} iterations beyond the FP checkpoint, so a short '
                 'FP stage can end below a quantized one: the FP row is their starting point, not an upper bound. ')
    lines += ['', 'Two small photos and one seed: treat differences of a few hundredths of a dB as noise. ' + start
              + 'This is a smoke-scale study, not a reproduction of the paper (DIV2K, 60K iterations, '
              'Set5/Set14/B100/Urban100).']
    pngs = [f'comparison_w{b}.png' for b in s['bits']]
    lines += ['', 'Crops: ' + ', '.join(f'[{p}]({p})' for p in pngs) + ' (bicubic | FP | baseline | ODM).', '']
    return '\n'.join(lines)
