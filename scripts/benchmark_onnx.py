#!/usr/bin/env python
"""Time onnxruntime (CPU provider) on the integer ONNX model of a quantized SR network against its FP32 float twin.

Models: for each ``--archs`` (EDSR-baseline: 64 features, 16 blocks; RLFN: the published x4 layout) and
``--scales``, a ``Quantized`` network (``--w-bits`` / ``--a-bits``, ``act_grid: aligned``, ``weight_grid:
midtread``, ``output_quant: auto``) is built, calibrated on random inputs in [0, 1] (latency does not depend on the
weight values), put in deploy form (``odm_basicsr.deploy.to_deploy``) and exported with
``odm_basicsr.deploy.onnx_export.export_onnx``: the integer model (QCDQ, fused into ``QLinearConv`` by onnxruntime)
and, with ``float_path``, the float twin (the same network with float convs on the same dequantized weights), the
FP32 reference. ``--onnx model.onnx --float model_float.onnx`` times a given pair instead (e.g. from ``odm-export``);
its scale is read from the output shape.

Timing: one ``InferenceSession`` per model (all graph optimizations, ``--threads`` intra-op threads, 1 inter-op
thread), square random inputs of ``--sizes`` px (LR side, batch 1, the same input for both models). After
``--warmup`` untimed runs per (model, size), ``--rounds`` rounds each run every (arch, scale, size, model)
combination once, round-robin, in an order shuffled every round (seeded), so that the two models of a pair and the
input sizes are interleaved in time and drifts of a shared machine fall on all of them alike. One timed run is
``session.run`` on a prepared float32 array, timed with ``time.perf_counter()``. Reported per (model, size): the
median over the rounds (plus min and interquartile range), and per (arch, scale, size) the ratio
``int_ms / fp32_ms`` of the medians (below 1: the integer model is faster).

Counts from onnxruntime's optimized graph (``onnxruntime_check.conv_kinds``): the integer model's integer convs
(``QLinearConv`` / ``ConvInteger``) and float convs, the float twin's convs, and the integer model's
``Transpose`` nodes (onnxruntime's NHWC layout for ``QLinearConv`` puts them around the integer convs). The number
of quantized convs is read from the integer ONNX file itself (a ``Conv`` whose weight is a ``DequantizeLinear`` of
integer codes), so it is known for a given pair too.

Output: a Markdown table, then one JSON object as the last line of stdout; ``--json`` / ``--md`` also write them.
"""
import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import numpy as np

ARCHS = ('EDSR', 'RLFN')
DEFAULT_SIZES = (64, 128, 256)
DEFAULT_SCALES = (2, 4)
#: The default run (2 archs x 2 scales x 3 sizes x 2 models) took 357 s of timing, 392 s in all, on one thread of a
#: 2-core Xeon whose other core was busy (load average 3-4); less on an idle machine.
DEFAULT_ROUNDS = 30
#: CPU flags of the int8 dot-product instructions onnxruntime's MLAS uses for u8s8 convolutions.
VNNI_FLAGS = ('avx512_vnni', 'avx_vnni', 'avx_vnni_int8', 'amx_int8', 'asimddp', 'i8mm')
KINDS = ('fp32', 'int')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--archs', nargs='+', default=list(ARCHS), choices=ARCHS, help='networks to build (default: both)')
    p.add_argument('--scales', nargs='+', type=int, default=None,
                   help=f'upscaling factors (default: {" ".join(map(str, DEFAULT_SCALES))})')
    p.add_argument('--sizes', nargs='+', type=int, default=list(DEFAULT_SIZES),
                   help=f'LR input sides in px, square (default: {" ".join(map(str, DEFAULT_SIZES))})')
    p.add_argument('--rounds', type=int, default=DEFAULT_ROUNDS, help=f'timed rounds (default: {DEFAULT_ROUNDS})')
    p.add_argument('--warmup', type=int, default=1,
                   help='untimed runs per (model, size) first (default: 1; 0 still runs once, to read the scale)')
    p.add_argument('--threads', type=int, default=1, help='onnxruntime intra-op threads (default: 1)')
    p.add_argument('--seed', type=int, default=0, help='inputs, calibration and round order (default: 0)')
    p.add_argument('--w-bits', type=int, default=4, help='weight bits of the built networks (default: 4)')
    p.add_argument('--a-bits', type=int, default=4, help='activation bits of the built networks (default: 4)')
    p.add_argument('--num-feat', type=int, default=None, help='override num_feat of the built archs (tests)')
    p.add_argument('--num-block', type=int, default=None, help='override num_block of the built archs (tests)')
    p.add_argument('--exporter', default='auto', choices=('auto', 'dynamo', 'torchscript'),
                   help='PyTorch ONNX exporter of the float graph (default: auto)')
    p.add_argument('--workdir', default=None, help='keep the exported models there (default: a temporary folder)')
    p.add_argument('--onnx', default=None, help='time this integer model instead of building networks')
    p.add_argument('--float', default=None, dest='float_path',
                   help='its FP32 float twin (default with --onnx: <stem>_float.onnx next to it)')
    p.add_argument('--label', default=None, help='arch label of the --onnx pair (default: its file name)')
    p.add_argument('--json', default=None, help='also write the JSON object there')
    p.add_argument('--md', default=None, help='also write the Markdown table there')
    return p


# ------------------------------------------------------------------------------------------------ machine
def machine_info():
    """CPU model name and its int8 dot-product flags (Linux ``/proc/cpuinfo``), core count, library versions."""
    import onnxruntime as ort

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key == 'model name' and model in ('', platform.processor(), platform.machine()):
                    model = value.strip()
                elif key in ('flags', 'Features') and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    present = [f for f in VNNI_FLAGS if f in flags]
    return dict(cpu=model, logical_cpus=os.cpu_count(), vnni=bool(present), vnni_flags=present,
                onnxruntime=ort.__version__, python=platform.python_version(), platform=platform.platform())


def _load():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ models
def arch_options(arch, scale, num_feat=None, num_block=None):
    """The FP arch of ``--archs`` at ``scale``: EDSR-baseline (64 features, 16 blocks) or RLFN (its defaults)."""
    opt = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=64, num_block=16, upscale=scale) if arch == 'EDSR' \
        else dict(type='RLFN', upscale=scale)
    if num_feat is not None:
        opt['num_feat'] = num_feat
        if arch == 'RLFN':
            opt.update(mid_feat=num_feat, esa_feat=max(num_feat // 3, 2))
    if num_block is not None:
        opt['num_block'] = num_block
    return opt


def build_pair(arch, scale, workdir, args):
    """Build, calibrate, deploy and export one network; returns the model entry (paths and counts)."""
    import torch

    import odm_basicsr.plugin  # noqa: F401  (BasicSR fixes + registration first)

    # isort: split
    from basicsr.archs import build_network

    from odm_basicsr.deploy import to_deploy
    from odm_basicsr.deploy.onnx_export import export_onnx
    from odm_basicsr.quant import calibrate

    arch_opt = arch_options(arch, scale, args.num_feat, args.num_block)
    net = build_network(dict(type='Quantized', arch=arch_opt, w_bits=args.w_bits, a_bits=args.a_bits,
                             act_grid='aligned', weight_grid='midtread', output_quant='auto'))
    net.eval()
    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.rand(2, arch_opt.get('num_in_ch', 3), 48, 48, generator=g)]
    with torch.no_grad():
        calibrate(net, batches)
    deployed, summary = to_deploy(net)
    stem = os.path.join(workdir, f'{arch}_x{scale}_W{args.w_bits}A{args.a_bits}')
    path, float_path = stem + '.onnx', stem + '_float.onnx'
    example = torch.rand(1, batches[0].shape[1], 32, 32, generator=g)
    report = export_onnx(deployed, path, example, exporter=args.exporter, float_path=float_path)
    return dict(arch=arch, scale=scale, source='built', arch_options=arch_opt, w_bits=args.w_bits,
                a_bits=args.a_bits, onnx=path, float=float_path, deploy_integer_layers=len(summary['integer_layers']),
                export_quantized_convs=len(report['layers']), relus_absorbed=report['relus_absorbed'])


def quantized_convs_in_graph(path):
    """``Conv`` nodes of the ONNX file at ``path`` whose weight is the ``DequantizeLinear`` of an integer
    initializer (the quantized convs the QCDQ writer produced)."""
    import onnx
    from onnx import TensorProto

    integer_types = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}
    graph = onnx.load(path, load_external_data=False).graph
    codes = {i.name for i in graph.initializer if i.data_type in integer_types}
    dequantized = {n.output[0] for n in graph.node if n.op_type == 'DequantizeLinear' and n.input[0] in codes}
    return sum(1 for n in graph.node if n.op_type == 'Conv' and len(n.input) > 1 and n.input[1] in dequantized)


def graph_counts(entry):
    """Conv counts of onnxruntime's optimized graphs of the pair, added to ``entry``."""
    from odm_basicsr.deploy.onnxruntime_check import conv_kinds

    int_kinds, fp_kinds = conv_kinds(entry['onnx']), conv_kinds(entry['float'])
    entry.update(quantized_convs=quantized_convs_in_graph(entry['onnx']), int_integer_convs=int_kinds['integer'],
                 int_float_convs=int_kinds['float'], fp32_convs=fp_kinds['float'],
                 fp32_integer_convs=fp_kinds['integer'], int_transposes=int_kinds['ops'].get('Transpose', 0),
                 int_ops=dict(sorted(int_kinds['ops'].items())), fp32_ops=dict(sorted(fp_kinds['ops'].items())))
    return entry


def given_pair(args):
    path = args.onnx
    if not os.path.isfile(path):
        raise SystemExit(f'--onnx: file not found: {path}')
    float_path = args.float_path or os.path.splitext(path)[0] + '_float.onnx'
    if not os.path.isfile(float_path):
        raise SystemExit(f'the FP32 twin of {path} was not found at {float_path}: give it with --float')
    label = args.label or os.path.basename(path)
    return dict(arch=label, scale=None, source='given', onnx=os.path.abspath(path), float=os.path.abspath(float_path))


# ------------------------------------------------------------------------------------------------ timing
def _session_input(session):
    inp = session.get_inputs()[0]
    channels = inp.shape[1] if len(inp.shape) > 1 and isinstance(inp.shape[1], int) else 3
    return inp.name, channels


def time_pairs(entries, sizes, rounds, warmup, threads, seed):
    """Round-robin timing of every (entry, size, kind); returns ``{(index, size, kind): [seconds, ...]}`` and the
    output scale of each entry (from the warm-up outputs)."""
    from odm_basicsr.deploy.onnxruntime_check import create_session

    sessions, feeds, inputs = {}, {}, {}
    rng = np.random.default_rng(seed)
    for i, e in enumerate(entries):
        sessions[i, 'fp32'] = create_session(e['float'], threads=threads)
        sessions[i, 'int'] = create_session(e['onnx'], threads=threads)
        for kind in KINDS:
            name, channels = _session_input(sessions[i, kind])
            for size in sizes:
                key = (channels, size)
                if key not in inputs:
                    inputs[key] = rng.random((1, channels, size, size), dtype=np.float32)
                feeds[i, kind, size] = {name: inputs[key]}
    scales = {}
    for i, e in enumerate(entries):  # warm-up; also checks that both models agree on the output shape
        for size in sizes:
            shapes = {}
            for kind in KINDS:
                for _ in range(max(warmup, 1)):
                    y = sessions[i, kind].run(None, feeds[i, kind, size])[0]
                shapes[kind] = y.shape
            if shapes['fp32'] != shapes['int']:
                raise SystemExit(f'{e["arch"]}: the FP32 and integer models give different output shapes '
                                 f'{shapes["fp32"]} / {shapes["int"]} at {size} px: not a pair')
            scale = shapes['int'][-1] // size
            if scales.setdefault(i, scale) != scale or shapes['int'][-1] != size * scale:
                raise SystemExit(f'{e["arch"]}: output {shapes["int"]} of a {size} px input is no integer upscaling')
    tasks = [(i, size, kind) for i in range(len(entries)) for size in sizes for kind in KINDS]
    order_rng = random.Random(seed)
    times = {t: [] for t in tasks}
    for _ in range(rounds):
        order_rng.shuffle(tasks)
        for i, size, kind in tasks:
            session, feed = sessions[i, kind], feeds[i, kind, size]
            t = time.perf_counter()
            session.run(None, feed)
            times[i, size, kind].append(time.perf_counter() - t)
    return times, scales


def _stats_ms(values):
    ms = sorted(v * 1e3 for v in values)
    q = np.percentile(ms, [25, 75]) if len(ms) > 1 else [ms[0], ms[0]]
    return statistics.median(ms), ms[0], [float(q[0]), float(q[1])]


# ------------------------------------------------------------------------------------------------ report
def format_markdown(result):
    m = result['machine']
    lines = [f'onnxruntime {m["onnxruntime"]} CPU provider, {result["threads"]} intra-op thread(s), '
             f'{result["rounds"]} round-robin rounds (median); {m["cpu"]}, {m["logical_cpus"]} logical CPUs, '
             f'VNNI: {", ".join(m["vnni_flags"]) if m["vnni"] else "no"}', '',
             '| arch | scale | bits | LR px | FP32 ms | int ms | int/FP32 | int convs / quantized | '
             'float convs (int / FP32 model) | Transposes (int) |',
             '|---|---|---|---|---|---|---|---|---|---|']
    def ms(v):
        return f'{v:.1f}' if v >= 10 else f'{v:.3f}'

    for r in result['results']:
        bits = f'W{r["w_bits"]}A{r["a_bits"]}' if r.get('w_bits') else '-'
        lines.append(f'| {r["arch"]} | x{r["scale"]} | {bits} | {r["size"]} | {ms(r["fp32_ms"])} | '
                     f'{ms(r["int_ms"])} | {r["ratio"]:.3f} | {r["int_integer_convs"]} / {r["quantized_convs"]} | '
                     f'{r["int_float_convs"]} / {r["fp32_convs"]} | {r["int_transposes"]} |')
    return '\n'.join(lines) + '\n'


def run(args):
    t0 = time.time()
    if args.rounds < 1 or args.threads < 1 or args.warmup < 0:
        raise SystemExit('--rounds and --threads must be at least 1, --warmup at least 0')
    if any(s < 1 for s in args.sizes):
        raise SystemExit(f'--sizes must be positive, got {args.sizes}')
    sizes = list(dict.fromkeys(args.sizes))
    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        if args.onnx:
            if args.scales:
                print('note: --scales is ignored with --onnx (the scale is read from the model output)',
                      file=sys.stderr)
            entries = [given_pair(args)]
        else:
            scales = list(dict.fromkeys(args.scales or DEFAULT_SCALES))
            entries = []
            for arch in dict.fromkeys(args.archs):
                for scale in scales:
                    t = time.time()
                    entries.append(build_pair(arch, scale, workdir, args))
                    print(f'built and exported {arch} x{scale} in {time.time() - t:.1f} s', file=sys.stderr)
        for e in entries:
            graph_counts(e)
        t = time.time()
        times, out_scales = time_pairs(entries, sizes, args.rounds, args.warmup, args.threads, args.seed)
        timing_s = time.time() - t
    results = []
    for i, e in enumerate(entries):
        if e['scale'] is None:
            e['scale'] = out_scales[i]
        elif e['scale'] != out_scales[i]:
            raise SystemExit(f'{e["arch"]}: built for x{e["scale"]}, the ONNX model upscales x{out_scales[i]}')
        for size in sizes:
            fp_med, fp_min, fp_iqr = _stats_ms(times[i, size, 'fp32'])
            int_med, int_min, int_iqr = _stats_ms(times[i, size, 'int'])
            row = dict(arch=e['arch'], scale=e['scale'], size=size, w_bits=e.get('w_bits'), a_bits=e.get('a_bits'),
                       fp32_ms=fp_med, int_ms=int_med, ratio=int_med / fp_med, fp32_min_ms=fp_min,
                       int_min_ms=int_min, fp32_iqr_ms=fp_iqr, int_iqr_ms=int_iqr)
            row.update({k: e[k] for k in ('quantized_convs', 'int_integer_convs', 'int_float_convs', 'fp32_convs',
                                          'fp32_integer_convs', 'int_transposes')})
            results.append(row)
    keep_paths = bool(args.workdir or args.onnx)  # built into a temporary folder: the files are gone
    models = [{k: v for k, v in e.items() if keep_paths or k not in ('onnx', 'float')} for e in entries]
    result = dict(machine=dict(machine_info(), load_before=load_before, load_after=_load()), threads=args.threads,
                  rounds=args.rounds, warmup=args.warmup, sizes=sizes, seed=args.seed,
                  order='every (model, size) once per round, order shuffled each round', timing_s=round(timing_s, 1),
                  total_s=round(time.time() - t0, 1), results=results, models=models)
    md = format_markdown(result)
    line = json.dumps(result)
    for path, text in ((args.json, json.dumps(result, indent=2) + '\n'), (args.md, md)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, 'w', encoding='utf-8') as f:
                f.write(text)
    print(md)
    print(line)
    sys.stdout.flush()
    return result


def main(argv=None):
    """Parse ``argv`` (default: ``sys.argv[1:]``), run, and return the result dictionary."""
    return run(build_parser().parse_args(argv))


if __name__ == '__main__':
    main()
