"""The ``odm-inspect`` command line (see the package docstring)."""
import argparse
import json
import os
import time

from odm_basicsr.network_options import read_network_options, window_size
from odm_basicsr.tool_cli import pick_device, run_cli

from .figure import draw_figure
from .network import DEFAULT_BITS, InspectError, is_quantized_opt, list_images, load_inputs, prepare_network
from .statistics import MAX_SAMPLES, PERCENTILES, inspect_network
from .table import format_markdown, json_safe

PROG = 'odm-inspect'


def build_parser():
    from odm_basicsr import inspect_layers

    p = argparse.ArgumentParser(prog=PROG, description=inspect_layers.__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-opt', '--opt', required=True,
                   help='option file (or network_g YAML): a Quantized network_g, or a plain FP arch')
    p.add_argument('--checkpoint', required=True, help='quantized checkpoint (Quantized network_g) or FP checkpoint')
    p.add_argument('--data', required=True, help='folder of LR images, or a benchmark set root holding LRbicx<scale>')
    p.add_argument('--out', default=None, help='output folder (default: inspect/<checkpoint stem>)')
    p.add_argument('--images', type=int, default=None, help='use the first N images (sorted by name; default: all)')
    p.add_argument('--bits', type=int, default=None,
                   help=f'FP arch only: weight and activation bits of the Quantized wrapper (default {DEFAULT_BITS})')
    p.add_argument('--layers', nargs='+', default=None,
                   help='FP arch only: layers to quantize: default | all | glob / re: patterns (default: default)')
    p.add_argument('--scale', type=int, default=None, help="upscaling factor (default: the option file's)")
    p.add_argument('--param-key', default='params_ema', help='checkpoint entry (falls back to params)')
    p.add_argument('--max-samples', type=int, default=MAX_SAMPLES,
                   help=f'values per layer kept for the percentiles (default {MAX_SAMPLES})')
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'), help='default: auto')
    p.add_argument('--threads', type=int, default=None,
                   help="CPU threads of torch (default: torch's choice; 1 is much faster on a busy machine)")
    return p


def run(args):
    import torch

    start = time.perf_counter()
    if args.threads is not None:
        if args.threads < 1:
            raise InspectError(f'--threads must be >= 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    if not os.path.isfile(args.opt):
        raise InspectError(f'option file not found: {args.opt}')
    if not os.path.isfile(args.checkpoint):
        raise InspectError(f'checkpoint file not found: {args.checkpoint}')
    if args.images is not None and args.images < 1:
        raise InspectError(f'--images must be >= 1, got {args.images}')
    if args.max_samples < 1000:
        raise InspectError(f'--max-samples must be >= 1000, got {args.max_samples}')
    if args.bits is not None and args.bits not in (2, 3, 4, 5, 6, 7, 8):
        raise InspectError(f'--bits must be 2..8, got {args.bits}')
    net_opt, scale = read_network_options(args.opt, args.scale)
    folder, paths = list_images(args.data, scale)
    if args.images is not None:
        paths = paths[:args.images]
    device = pick_device(args.device)
    inputs = load_inputs(paths, device, window_size(net_opt))
    net, how = prepare_network(net_opt, args, inputs)
    net.to(device).eval()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    t0 = time.perf_counter()
    rows = inspect_network(net, inputs, args.max_samples)
    t_inspect = time.perf_counter() - t0
    after = net.state_dict()
    if any(not torch.equal(before[k], after[k]) for k in before):  # a guard on this tool itself
        raise RuntimeError('odm-inspect changed the network state while inspecting it')

    out = args.out or os.path.join('inspect', os.path.splitext(os.path.basename(args.checkpoint))[0])
    os.makedirs(out, exist_ok=True)
    exact = all(r.get('percentile_sample', {}).get('exact', True) for r in rows)
    sampling = ('exact (every value)' if exact else
                f'from a seeded uniform subsample of at most {args.max_samples} values per layer where a layer has '
                'more (see layers.json, percentile_sample)')
    q_layers = [r for r in rows if r['calls']]
    bits = sorted({f'W{r["w_bits"]}A{r["a_bits"]}' for r in rows})
    header = (f'Network `{net_opt["type"]}`'
              + (f' ({net_opt.get("arch", {}).get("type")})' if is_quantized_opt(net_opt) else '')
              + f' from `{args.opt}`, checkpoint `{args.checkpoint}` ({how["source"]}), {", ".join(bits)}, '
              f'{len(q_layers)} quantized layers in forward order. Data: {len(paths)} image(s) of `{folder}`, '
              'one at a time, network in full precision. min / max, clipped fraction, SQNR, mismatch scores '
              f'(shift / scale) and variance (channel reduction, all images pooled) are exact; percentiles are '
              f'{sampling}.')
    md = format_markdown(rows)
    with open(os.path.join(out, 'layers.md'), 'w', encoding='utf-8') as f:
        f.write(f'# odm-inspect\n\n{header}\n\n{md}')
    settings = {
        'opt': args.opt, 'network_g': net_opt, 'scale': scale, 'checkpoint': args.checkpoint,
        'param_key': how['param_key'], 'source': how['source'], 'calibrated_here': how['calibrated_here'],
        'bits': how.get('bits'), 'layers': how.get('layers'), 'quantized_network_g': how.get('quantized_opt'),
        'data': folder, 'images': [{'path': p, 'shape': list(x.shape[-2:])} for p, x in zip(paths, inputs)],
        'device': str(device), 'percentiles': list(PERCENTILES), 'percentile_method': 'numpy linear interpolation',
        'max_samples': args.max_samples, 'percentiles_exact': exact,
        'definitions': {
            'input': 'the layer input when the whole network runs in full precision',
            'clipped': 'fraction of input values below lower or above upper (after the offset normalisation)',
            'input_sqnr_db': "10 log10(sum x^2 / sum (x - effective_input(x))^2); 'inf' = no error",
            'weight_sqnr_db': '10 log10(sum W^2 / sum (W - Q_w(W))^2); W times rho for an unfolded scale offset',
            'mismatch_shift': 'std_c(mu_c) / mean_c(sigma_c)', 'mismatch_scale': 'std_c(sigma_c) / mean_c(sigma_c)',
            'variance': 'mean over channels of the variance over all images pixels (channel reduction, pooled)',
            'variance_per_image_mean': "mean over images of feature_variance(x, 'channel')",
        },
        'seconds': {'inspect': round(t_inspect, 3), 'total': None},
    }
    png = os.path.join(out, 'layers.png')
    title = (f'{net_opt["type"] if not is_quantized_opt(net_opt) else net_opt["arch"]["type"]} '
             f'{", ".join(bits)} - {os.path.basename(args.checkpoint)} - {len(paths)} image(s) of {folder}')
    draw_figure(png, rows, title)
    settings['seconds']['total'] = round(time.perf_counter() - start, 3)
    with open(os.path.join(out, 'layers.json'), 'w', encoding='utf-8') as f:
        json.dump(json_safe({'settings': settings, 'layers': rows}), f, indent=1, allow_nan=False)
    print(md, end='')
    print(f'{len(q_layers)} layers, {len(paths)} image(s), {settings["seconds"]["total"]:.1f} s; written: '
          f'{os.path.join(out, "layers.md")}, {os.path.join(out, "layers.json")}, {png}')
    return rows


def main(argv=None):
    return run_cli(PROG, build_parser(), run, argv)
