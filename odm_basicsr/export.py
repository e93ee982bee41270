"""odm-export: a trained quantized checkpoint as a compact file and an integer ONNX model, with a report.

    odm-export -opt NET.yml --checkpoint C.pth --out DIR [--data BENCH --sets Set5] [--calib LR_DIR]
               [--fp16] [--format int8|int4] [--target onnxruntime|tensorrt] [--output-quant auto|trained|none]

Every flag after ``--scale`` is also a key of the option file's ``export`` section
(:data:`odm_basicsr.option_schema.EXPORT`, documented in the README), which the flag overrides.

Writes to DIR:

* ``model.safetensors``: the compact file (b-bit weight codes packed into bytes, full-precision layers in float32 or,
  with ``--fp16``, float16); ``odm_basicsr.deploy.load(path)`` rebuilds the network without BasicSR's trainer;
* ``model.onnx``: opset 21, the quantized convolutions in QCDQ form with int8 containers (``--format int4``: int4
  weight initializers, smaller, float convolutions in onnxruntime today), input ``lq`` and output ``sr`` exactly as
  the PyTorch network takes and gives them (N, C, H, W float32 in [0, 1]), dynamic batch and size;
  ``model_float.onnx``: the same network with float convolutions on the same (dequantized) weights, the FP32
  reference of the latency figures; ``--target tensorrt`` adds ``model_tensorrt.onnx`` (int8, zero point 0;
  exported, not tested on TensorRT here);
* ``export.json`` and ``export.md``: sizes against the FP32 checkpoint, the convolutions onnxruntime runs as integer
  ones, parity (compact reload, deploy form against the trained network, onnxruntime against the deploy form, on
  ``--data``), latency on one input size.

Exit status: 0 done, 2 bad input (the message says which), 3 a non-finite checkpoint.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

from odm_basicsr.study.argtypes import non_negative_int, positive_int
from odm_basicsr.tool_cli import ToolError, run_cli
from odm_basicsr.utils.schema import Boolean, Integer, OneOf, TextList


def build_parser():
    from odm_basicsr.option_schema import EXPORT

    p = argparse.ArgumentParser(prog='odm-export', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-opt', '--opt', required=True, help='BasicSR option file (network_g of type Quantized, scale; '
                   'its "export" section, if any, sets defaults for the flags below)')
    p.add_argument('--checkpoint', required=True, help='trained or calibrated quantized checkpoint (.pth)')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--param-key', default='params_ema', help='checkpoint entry (falls back to params)')
    p.add_argument('--scale', type=int, default=None, help='upscaling factor (default: the option file\'s)')
    for name, field in EXPORT.fields.items():  # one flag per option of the export section, which it overrides
        text = f'{field.doc} (option file: export.{name}; default: {field.shown_default()})'.replace('%', '%%')
        kind = field.kind
        flag = '--' + name.replace('_', '-')
        if isinstance(kind, Boolean):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(kind, TextList):
            p.add_argument(flag, nargs='+', default=None, help=text)
        elif isinstance(kind, Integer):
            p.add_argument(flag, type={0: non_negative_int, 1: positive_int}.get(kind.minimum, int), default=None,
                           help=text)
        elif isinstance(kind, OneOf):
            p.add_argument(flag, choices=kind.choices, default=None, help=text)
        else:
            p.add_argument(flag, default=None, help=text)
    return p


def export_options(args):
    """The ``export`` options: the option file's ``export`` section, overridden by the flags given, validated by
    :data:`odm_basicsr.option_schema.EXPORT` (defaults filled in)."""
    from odm_basicsr.network_options import read_option_file
    from odm_basicsr.option_schema import EXPORT
    from odm_basicsr.utils.schema import OptionError

    section = read_option_file(args.opt)[0].get('export') or {}
    if not isinstance(section, dict):
        raise ToolError(f'{args.opt}: option "export" must be a mapping, got {section!r}')
    given = {name: getattr(args, name) for name in EXPORT.fields if getattr(args, name) is not None}
    try:
        return EXPORT.validate({**section, **given}, where='export')
    except OptionError as e:
        raise ToolError(f'{args.opt}: {e}') from e


def _fail_deploy(e):
    raise ToolError(str(e)) from e


def _lr_tensor(path):
    from odm_basicsr.scoring import read_image, to_tensor

    return to_tensor(read_image(path))


def calibration_images(args, opt_path):
    """LR tensors for the output quantizers: ``--calib`` or the option file's ``datasets.train.dataroot_lq``."""
    from odm_basicsr.network_options import read_option_file
    from odm_basicsr.scoring import image_files

    folder = args.calib
    if folder is None:
        opt = read_option_file(opt_path)[0]
        folder = (((opt.get('datasets') or {}).get('train') or {}).get('dataroot_lq'))
        if not folder or not os.path.isdir(folder):
            raise ToolError('--output-quant auto adds output quantizers, which need calibration images: give '
                            '--calib <folder of LR images> (the option file names no training LQ folder here), '
                            'or --output-quant trained')
    files = image_files(folder)[:args.calib_images]
    if not files:
        raise ToolError(f'no images in the calibration folder {folder}')
    return [_lr_tensor(os.path.join(folder, f)) for f in files]


def fp32_checkpoint_bytes(net):
    """Size of the FP32 checkpoint of the same FP network as BasicSR writes it (``{'params': state}``), measured."""
    import torch

    from odm_basicsr.quant.layer_selection import quantizer_state_keys

    skip = set(quantizer_state_keys(net))
    state = {k: v.float() for k, v in net.state_dict().items() if k not in skip and v.is_floating_point()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'fp32.pth')
        torch.save({'params': state}, path)
        return os.path.getsize(path)


def _psnr(a, b, peak=255.0):
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float('inf') if mse == 0 else 10 * np.log10(peak**2 / mse)


@contextlib.contextmanager
def one_torch_thread():
    """PyTorch on one intra-op thread inside the block (as onnxruntime runs here), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def output_agreement(a, b):
    """``(psnr, share within 1 grey level, largest grey-level difference)`` of two network outputs (N, C, H, W),
    as float images on the 0..255 scale (PSNR) and as the 8-bit images BasicSR writes (the other two)."""
    import numpy as np
    from basicsr.utils import tensor2img

    psnr = _psnr(a.float().clamp(0, 1).numpy() * 255, b.float().clamp(0, 1).numpy() * 255)
    a8, b8 = tensor2img([a.float()]).astype(np.int16), tensor2img([b.float()]).astype(np.int16)
    return psnr, float(np.mean(np.abs(a8 - b8) <= 1)), int(np.abs(a8 - b8).max())


def parity(trained, deployed, session, pairs, scale, floor=None):
    """Y-channel PSNR of the trained, deployed and onnxruntime networks, and output agreement, per image.

    PyTorch runs on one thread here, as onnxruntime does (``create_session``): PyTorch's float convolutions round
    differently with the number of threads, so a multi-threaded reference would make the report depend on the
    machine's core count. ``floor`` (:func:`odm_basicsr.deploy.integer_layers.float64_twin`) adds the float noise
    floor per image: the float64 network's output against the deploy form's.
    """
    import torch
    from basicsr.utils import tensor2img

    from odm_basicsr.deploy.onnxruntime_check import run
    from odm_basicsr.scoring import iter_pairs, y_psnr

    rows = []
    with one_torch_thread():
        for name, lq, hr in iter_pairs(pairs, scale):
            with torch.no_grad():
                out_trained, out_deploy = trained(lq), deployed(lq)
                out_floor = floor(lq.double()) if floor is not None else None
            out_ort = torch.from_numpy(run(session, lq)) if session is not None else None
            row = dict(image=name)
            for key, out in (('trained', out_trained), ('deploy', out_deploy), ('onnxruntime', out_ort)):
                if out is not None:
                    row[f'psnr_{key}'] = y_psnr(tensor2img([out]), hr, scale)
            for key, out in (('ort_vs_deploy', out_ort), ('float_floor', out_floor)):
                if out is not None:
                    row[f'{key}_psnr'], row[f'{key}_within_1'], row[f'{key}_max_grey'] = output_agreement(
                        out, out_deploy)
            rows.append(row)
    return rows


#: Parity bound of onnxruntime against the deploy form: lowest per-image output PSNR (dB), and the share of 8-bit
#: pixels at most one grey level apart (mean over the images).
PARITY_BOUND = (60.0, 0.999)


def _agreement_summary(rows, key):
    """``<key>_psnr`` (lowest per image), ``<key>_within_1`` (mean), ``<key>_max_grey`` (largest) over ``rows``."""
    values = [r for r in rows if f'{key}_psnr' in r]
    if not values:
        return {}
    return {f'{key}_psnr': min(r[f'{key}_psnr'] for r in values), f'{key}_within_1': _mean(values, f'{key}_within_1'),
            f'{key}_max_grey': max(r[f'{key}_max_grey'] for r in values)}


def meets_parity_bound(summary, key='ort_vs_deploy'):
    """Whether a set's agreement summary is within :data:`PARITY_BOUND`."""
    return summary[f'{key}_psnr'] >= PARITY_BOUND[0] and summary[f'{key}_within_1'] >= PARITY_BOUND[1]


def _mean(rows, key):
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else None


def run(args):
    import torch

    from odm_basicsr.deploy import DeployError, load, round_float_layers, save, to_deploy
    from odm_basicsr.deploy.integer_layers import float64_twin
    from odm_basicsr.network_options import build_network, read_network_options
    from odm_basicsr.quant.float_outputs import example_input
    from odm_basicsr.scoring import list_pairs, load_weights

    if not os.path.isfile(args.checkpoint):
        raise ToolError(f'checkpoint file not found: {args.checkpoint}')
    options = export_options(args)
    args = argparse.Namespace(**{**vars(args), **options})
    if args.calib is not None and not os.path.isdir(args.calib):
        raise ToolError(f'calibration folder not found: {args.calib}')
    net_opt, scale = read_network_options(args.opt, args.scale)
    if net_opt.get('type') != 'Quantized':
        raise ToolError(f'{args.opt}: network_g is {net_opt.get("type")!r}, not a Quantized network; export the '
                        'quantized option file the checkpoint was trained with')
    pairs = {s: list_pairs(args.data, s, scale) for s in args.sets} if args.data else {}
    net = build_network(net_opt)
    key = load_weights(net, args.checkpoint, args.param_key)
    net.eval()
    probe = example_input(net, net.quant_config['arch'], size=48)
    with torch.no_grad():
        factor = net(probe).shape[-1] // probe.shape[-1]
    if factor != scale:
        raise ToolError(f'the network upscales by {factor}, not {scale} ('
                        + ('--scale' if args.scale else "the option file's scale") + ')')
    mode, calib = args.output_quant, None
    if mode == 'auto':
        needed = _output_quantizers_needed(net, probe)
        calib = calibration_images(args, args.opt) if needed else None
        mode = 'auto' if needed else 'trained'
    t0 = time.time()
    try:
        deployed, summary = to_deploy(net, output_quant=mode, batches=calib, example=probe)
    except DeployError as e:
        _fail_deploy(e)
    os.makedirs(args.out, exist_ok=True)
    compact = os.path.join(args.out, 'model.safetensors')
    compact_bytes = save(deployed, compact, fp16=args.fp16)
    reference = round_float_layers(_copy(deployed)) if args.fp16 else deployed
    reloaded = load(compact)
    with torch.no_grad():
        reload_identical = bool(torch.equal(reloaded(probe), reference(probe)))
    report = dict(option_file=args.opt, checkpoint=args.checkpoint, param_key=key, export_options=options,
                  arch=net_opt['arch']['type'],
                  scale=scale, w_bits=net_opt.get('w_bits', 4), a_bits=net_opt.get('a_bits', 4),
                  quantized_layers=summary['integer_layers'], output_quant=args.output_quant,
                  added_output_quantizers=summary['added_output_quantizers'],
                  residual_scales_folded=summary['residual_scales_folded'],
                  max_nudge_steps=max((abs(v) for v in summary['nudged'].values()), default=0.0),
                  sizes=dict(fp32_checkpoint=fp32_checkpoint_bytes(net), compact=compact_bytes,
                             compact_float_dtype='float16' if args.fp16 else 'float32'),
                  compact_reload_bit_identical=reload_identical)
    session = None
    if args.onnx:
        session = _export_onnx(args, deployed, report, probe)
    if pairs:
        report['parity'] = {}
        floor = float64_twin(reference)
        for set_name, set_pairs in pairs.items():
            rows = parity(net, reference, session, set_pairs, scale, floor=floor)
            report['parity'][set_name] = dict(
                images=len(rows), psnr_trained=_mean(rows, 'psnr_trained'), psnr_deploy=_mean(rows, 'psnr_deploy'),
                psnr_onnxruntime=_mean(rows, 'psnr_onnxruntime'), **_agreement_summary(rows, 'ort_vs_deploy'),
                **_agreement_summary(rows, 'float_floor'),
                per_image=rows)
    if session is not None and pairs:
        from odm_basicsr.deploy.onnxruntime_check import code_agreement

        set_name, set_pairs = next(iter(pairs.items()))
        with one_torch_thread():
            per_layer = code_agreement(reference, os.path.join(args.out, 'model.onnx'), _lr_tensor(set_pairs[0][1]))
        first = next((name for name, v in per_layer.items() if v['differ'] > 0), None)
        report['onnxruntime']['code_agreement'] = dict(
            image=f'{set_name}/{set_pairs[0][0]}', first_differing_layer=first,
            first_differing_share=per_layer[first]['differ'] if first else 0.0, per_layer=per_layer)
    report['seconds'] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, 'export.json'), 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=2)
    md = format_report(report)
    with open(os.path.join(args.out, 'export.md'), 'w', encoding='utf-8') as f:
        f.write(md)
    print(md, end='')
    print(f'written: {args.out}/model.safetensors' + (', model.onnx, model_float.onnx' if args.onnx else '')
          + ', export.json, export.md')
    if not reload_identical:
        raise ToolError('the compact file does not reload to the deploy form bit for bit (a bug: please report it)')
    return report


def _copy(net):
    import copy

    return copy.deepcopy(net)


def _output_quantizers_needed(net, example):
    from odm_basicsr.quant import quantized_layers
    from odm_basicsr.quant.float_outputs import float_output_layers

    floating = float_output_layers(net, example)
    layers = dict(quantized_layers(net))
    return [n for n in floating if layers[n].out_quant is None]


def _export_onnx(args, deployed, report, probe):
    import torch

    from odm_basicsr.deploy import DeployError
    from odm_basicsr.deploy.onnx_export import export_onnx
    from odm_basicsr.deploy.onnxruntime_check import conv_kinds, create_session, median_latency

    path, float_path = os.path.join(args.out, 'model.onnx'), os.path.join(args.out, 'model_float.onnx')
    example = torch.rand(1, probe.shape[1], 32, 32, generator=torch.Generator().manual_seed(0))
    try:
        graph = export_onnx(deployed, path, example, weight_format=args.format, exporter=args.exporter,
                            float_path=float_path, allow_float=args.allow_float)
        if args.target == 'tensorrt':
            trt = export_onnx(deployed, os.path.join(args.out, 'model_tensorrt.onnx'), example, target='tensorrt',
                              exporter=args.exporter, allow_float=args.allow_float)
            report['tensorrt'] = dict(file='model_tensorrt.onnx', tested='exported, untested (no TensorRT here)',
                                      output_codes_cut={k: v['output_codes_cut'] for k, v in trt['layers'].items()
                                                        if v.get('output_codes_cut')})
    except DeployError as e:
        _fail_deploy(e)
    kinds = conv_kinds(path)
    report['sizes'].update(onnx=os.path.getsize(path), onnx_float=os.path.getsize(float_path),
                           onnx_weight_format=args.format)
    report['onnxruntime'] = dict(integer_convs=kinds['integer'], float_convs=kinds['float'],
                                 quantized_convs=len(graph['layers']), relus_absorbed=graph['relus_absorbed'],
                                 float_layers=graph['float_layers'], ops=kinds['ops'])
    session = create_session(path)
    if args.latency_size:
        x = torch.rand(1, probe.shape[1], args.latency_size, args.latency_size)
        fp = create_session(float_path)
        t_int, t_fp = median_latency(session, x), median_latency(fp, x)
        report['latency'] = dict(lr_size=args.latency_size, threads=1, integer_s=t_int, float_s=t_fp,
                                 ratio=t_int / t_fp, note='one quick measurement; scripts/benchmark_onnx.py '
                                 'interleaves sizes and repeats')
    return session


def _agreement_line(title, p, key):
    return (f'{title}: lowest per-image output PSNR {p[f"{key}_psnr"]:.1f} dB; {100 * p[f"{key}_within_1"]:.3f} % of '
            f'8-bit pixels within 1 grey level (largest difference {p[f"{key}_max_grey"]})')


def _mb(n):
    return f'{n / 1e6:.3f} MB'


def format_report(r):
    s = r['sizes']
    lines = [f'# odm-export: {r["arch"]} x{r["scale"]} W{r["w_bits"]}A{r["a_bits"]} ({r["checkpoint"]})', '',
             '| file | size | vs FP32 checkpoint |', '|---|---|---|',
             f'| FP32 checkpoint (params only, as BasicSR saves it) | {_mb(s["fp32_checkpoint"])} | 1.00 |',
             f'| model.safetensors ({s["compact_float_dtype"]} FP layers) | {_mb(s["compact"])} | '
             f'{s["compact"] / s["fp32_checkpoint"]:.2f} |']
    if 'onnx' in s:
        lines += [f'| model.onnx ({s["onnx_weight_format"]} weights) | {_mb(s["onnx"])} | '
                  f'{s["onnx"] / s["fp32_checkpoint"]:.2f} |',
                  f'| model_float.onnx | {_mb(s["onnx_float"])} | {s["onnx_float"] / s["fp32_checkpoint"]:.2f} |']
    lines += ['', f'- compact file reloads bit-identically: {r["compact_reload_bit_identical"]}',
              f'- quantized convs: {len(r["quantized_layers"])}; output quantizers added at export: '
              f'{len(r["added_output_quantizers"])}; residual scalings folded: {len(r["residual_scales_folded"])}; '
              f'largest activation-grid nudge: {r["max_nudge_steps"]:.3f} step']
    if 'onnxruntime' in r:
        o = r['onnxruntime']
        lines.append(f'- onnxruntime optimized graph: {o["integer_convs"]} integer convs (QLinearConv) of '
                     f'{o["quantized_convs"]} quantized, {o["float_convs"]} float convs; ReLUs absorbed: '
                     f'{o["relus_absorbed"]}')
    if 'latency' in r:
        t = r['latency']
        lines.append(f'- latency at {t["lr_size"]} px LR, 1 thread: integer {t["integer_s"] * 1e3:.1f} ms, float '
                     f'{t["float_s"] * 1e3:.1f} ms, ratio {t["ratio"]:.2f}')
    if 'tensorrt' in r:
        lines.append(f'- TensorRT form: {r["tensorrt"]["file"]} ({r["tensorrt"]["tested"]})')
    for set_name, p in (r.get('parity') or {}).items():
        lines += ['', f'Parity on {set_name} ({p["images"]} images; Y-PSNR, border = scale):', '',
                  '| network | PSNR (dB) | vs trained |', '|---|---|---|',
                  f'| trained (fake quantization) | {p["psnr_trained"]:.4f} | |',
                  f'| deploy form (PyTorch) | {p["psnr_deploy"]:.4f} | {p["psnr_deploy"] - p["psnr_trained"]:+.4f} |']
        if p['psnr_onnxruntime'] is not None:
            lines += [f'| onnxruntime | {p["psnr_onnxruntime"]:.4f} | '
                      f'{p["psnr_onnxruntime"] - p["psnr_trained"]:+.4f} |', '',
                      _agreement_line('onnxruntime vs deploy form', p, 'ort_vs_deploy')
                      + f' (bound {PARITY_BOUND[0]:.0f} dB, {100 * PARITY_BOUND[1]:.1f} %: '
                      + ('met' if meets_parity_bound(p) else 'not met') + ')']
        if 'float_floor_psnr' in p:
            lines += ['', _agreement_line('float noise floor (the deploy form with its full-precision layers in '
                                          'float64 vs float32)', p, 'float_floor')
                      + ('; it misses the bound as well: this network amplifies last-bit float differences, whatever '
                         'computes it'
                         if p.get('ort_vs_deploy_psnr') is not None and not meets_parity_bound(p)
                         and not meets_parity_bound(p, 'float_floor') else '')]
    agreement = (r.get('onnxruntime') or {}).get('code_agreement')
    if agreement:
        last = list(agreement['per_layer'].items())[-1]
        where = ('every quantized layer sees the same input codes' if agreement['first_differing_layer'] is None
                 else f'the first layer whose input codes differ is {agreement["first_differing_layer"]} '
                      f'({100 * agreement["first_differing_share"]:.4f} % of its codes), the last '
                      f'({last[0]}) {100 * last[1]["differ"]:.3f} %')
        lines += ['', f'Integer codes, onnxruntime vs deploy form on {agreement["image"]}: {where}. (Codes that '
                  'float rounding moves across a grid boundary in a float layer change more codes downstream.)']
    return '\n'.join(lines) + '\n'


def main(argv=None):
    return run_cli('odm-export', build_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(main())
