"""The deploy form, its compact file and its integer ONNX model: exactness, sizes, onnxruntime's integer convs,
parity, and the errors of odm-export."""
import copy
import json
import os

import cv2
import numpy as np
import pytest
import torch
from basicsr.archs import build_network
from odm_helpers import TINY

from odm_basicsr.deploy import DeployError, IntegerConv2d, load, round_float_layers, save, to_deploy
from odm_basicsr.deploy.compact import read_metadata
from odm_basicsr.deploy.onnx_export import export_onnx
from odm_basicsr.deploy.onnxruntime_check import conv_kinds, create_session, run
from odm_basicsr.quant import calibrate, quantized_layers
from odm_basicsr.quant.calibration import calibration
from odm_basicsr.quant.offsets import attach_offsets, channel_statistics

EDSR_BASELINE_X4 = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=64, num_block=16, upscale=4)
DEPLOYABLE = dict(act_grid='aligned', weight_grid='midtread', output_quant='auto')


def calibrated(arch, bits=4, seed=0, size=24, **options):
    torch.manual_seed(seed)
    net = build_network(dict(type='Quantized', arch=arch, w_bits=bits, a_bits=bits, **options)).eval()
    calibrate(net, [torch.rand(2, arch.get('num_in_ch', 3), size, size)])
    return net


def tiny(name, scale=2):
    return dict(type=name, **TINY[name](scale))


def psnr(a, b):
    mse = float(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean())
    return float('inf') if mse == 0 else 10 * np.log10(1 / mse)


def test_integer_conv_is_the_hand_computed_integer_arithmetic():
    net = calibrated(tiny('EDSR'), **DEPLOYABLE)
    deployed, _ = to_deploy(net)
    layer = deployed.body[0].conv2
    assert isinstance(layer, IntegerConv2d)
    x = torch.rand(1, 8, 6, 6) * 4
    step, low = layer.in_step.item(), layer.in_low
    codes = np.clip(np.round(x.numpy() / np.float32(step)), low, low + 15).astype(np.int64)  # numpy: half to even
    w = layer.weight_codes.numpy().astype(np.int64)
    acc = np.zeros((1, 8, 6, 6), dtype=np.int64)  # exact integer convolution, zero padding = code 0
    padded = np.pad(codes, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i in range(3):
        for j in range(3):
            acc += np.einsum('oc,nchw->nohw', w[:, :, i, j], padded[:, :, i:i + 6, j:j + 6])
    acc += layer.bias_codes.numpy().astype(np.int64).reshape(1, -1, 1, 1)
    y = acc * (step * layer.weight_scale.numpy().astype(np.float64)).reshape(1, -1, 1, 1)
    out_codes = np.clip(np.round(y / layer.out_step.item()), layer.out_low, layer.out_low + 255)
    expected = out_codes * layer.out_step.item()
    got = layer(x).detach().numpy()
    # float32 accumulation in PyTorch vs exact integers here: equal but for rare flips of one output code
    assert np.mean(np.abs(got - expected) < 1e-4 * np.abs(expected).max() + 1e-6) > 0.999


def test_deploy_form_follows_the_trained_network_with_offsets_and_residual_scaling():
    arch = dict(tiny('EDSR'), res_scale=0.5)
    net = build_network(dict(type='Quantized', arch=arch, w_bits=4, a_bits=4, **DEPLOYABLE)).eval()
    batches = [torch.rand(2, 3, 24, 24) for _ in range(2)]
    with calibration(net), channel_statistics(net) as stats:
        for x in batches:
            net(x)
    attach_offsets(net, {'body.0.conv1': 'shift', 'body.1.conv2': 'scale'}, stats)
    calibrate(net, batches)
    deployed, summary = to_deploy(net)
    assert summary['residual_scales_folded'] == {'body.0': 0.5, 'body.1': 0.5}
    assert deployed.body[0].res_scale == 1.0 and deployed.body[0].conv1.pre == 'shift'
    assert deployed.body[1].conv2.pre == 'scale' and summary['nudged'] == {}  # trained on the aligned grid
    assert type(deployed).__name__ == 'EDSR'
    x = torch.rand(1, 3, 20, 20)
    with torch.no_grad():
        assert psnr(net(x), deployed(x)) > 45  # int32 bias rounding and the shift's border taps only


def test_nudging_a_free_grid_moves_each_range_by_at_most_half_a_step():
    net = calibrated(tiny('EDSR'), act_grid='free')
    _, summary = to_deploy(net)
    assert set(summary['nudged']) == {n for n, _ in quantized_layers(net)}
    assert all(abs(v) <= 0.5 for v in summary['nudged'].values())


@pytest.mark.parametrize('fp16', [False, True])
def test_compact_file_reloads_bit_identically(tmp_path, fp16):
    net = calibrated(tiny('RLFN'), **DEPLOYABLE)
    deployed, _ = to_deploy(net, output_quant='auto', batches=[torch.rand(1, 3, 24, 24)])
    path = str(tmp_path / 'model.safetensors')
    save(deployed, path, fp16=fp16)
    reference = round_float_layers(copy.deepcopy(deployed)) if fp16 else deployed
    x = torch.rand(2, 3, 17, 19)
    with torch.no_grad():
        assert torch.equal(load(path)(x), reference(x))
    meta = read_metadata(path)
    assert meta['arch_class'] == 'odm_basicsr.archs.rlfn_arch:RLFN' and len(meta['integer_layers']) == 6


def test_edsr_baseline_x4_w4a4_sizes_and_integer_convs(tmp_path):
    """The issue's targets, which depend on the architecture only: FP32 6.07 MB; compact <= 2.0 MB (<= 1.3 MB with
    float16); ONNX <= 2.7 MB; every quantized body conv an integer conv in onnxruntime's optimized graph."""
    net = calibrated(EDSR_BASELINE_X4, size=16, **DEPLOYABLE)
    fp32_bytes = 4 * sum(p.numel() for n, p in net.named_parameters() if 'quant' not in n)
    assert fp32_bytes / 1e6 == pytest.approx(6.07, abs=0.005)
    deployed, _ = to_deploy(net)
    compact = save(deployed, str(tmp_path / 'm.safetensors'))
    compact16 = save(deployed, str(tmp_path / 'm16.safetensors'), fp16=True)
    body = 32 * 64 * 64 * 9  # quantized weights: 4 bits each
    floats = fp32_bytes // 4 - body - 32 * 64  # full-precision parameters (not the 32 int32 biases)
    assert 0 < compact - (body // 2 + 4 * floats + 4 * 32 * 64) < 40_000  # what is stored, plus a small header
    assert compact <= 2.0e6 and compact16 <= 1.3e6
    path = str(tmp_path / 'm.onnx')
    report = export_onnx(deployed, path, torch.rand(1, 3, 32, 32), float_path=str(tmp_path / 'f.onnx'))
    assert os.path.getsize(path) <= 2.7e6
    assert report['relus_absorbed'] == 16 and report['float_layers'] == []
    kinds = conv_kinds(path)
    assert kinds['integer'] == 32 and kinds['float'] == 5  # head, after-body, two upsampler convs, last
    assert conv_kinds(str(tmp_path / 'f.onnx'))['integer'] == 0
    x = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        assert psnr(torch.from_numpy(run(create_session(path), x)), deployed(x)) > 60


@pytest.mark.parametrize('exporter', ['dynamo', 'torchscript'])
def test_onnx_model_takes_and_gives_what_the_network_does(tmp_path, exporter):
    net = calibrated(tiny('RLFN', 3), **DEPLOYABLE)
    deployed, _ = to_deploy(net, output_quant='auto', batches=[torch.rand(1, 3, 24, 24)])
    path = str(tmp_path / 'm.onnx')
    export_onnx(deployed, path, torch.rand(1, 3, 32, 32), exporter=exporter)
    session = create_session(path)
    assert [i.name for i in session.get_inputs()] == ['lq'] and [o.name for o in session.get_outputs()] == ['sr']
    assert conv_kinds(path)['integer'] == 6
    for shape in ((1, 3, 16, 16), (2, 3, 21, 30)):  # dynamic batch and size
        x = torch.rand(*shape)
        out = run(session, x)
        with torch.no_grad():
            ref = deployed(x)
        assert out.shape == tuple(ref.shape) and out.dtype == np.float32
        assert psnr(torch.from_numpy(out), ref) > 60
    import onnx

    assert 'Sigmoid' not in {n.op_type for n in onnx.load(path).graph.node}  # ESA's gate: precise_sigmoids


def test_precise_sigmoid_is_float32_sigmoid_to_one_rounding():
    """Where a sigmoid gate is small (ESA's gates: inputs -13..-3), the rewrite keeps its relative error at float32
    rounding, against the float64 closed form, as ``torch.sigmoid`` does; and it stays finite at the extremes."""
    import onnx
    from onnx import TensorProto, helper

    from odm_basicsr.deploy.onnx_export import precise_sigmoids

    graph = helper.make_graph([helper.make_node('Sigmoid', ['x'], ['y'])], 'g',
                              [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['n'])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['n'])])
    proto = precise_sigmoids(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)]))
    onnx.checker.check_model(proto)
    assert [n.op_type for n in proto.graph.node] == ['Neg', 'Exp', 'Add', 'Reciprocal']
    x = np.concatenate([np.linspace(-30, 30, 20001), [-200.0, -89.0, 89.0, 200.0]]).astype(np.float32)
    y = create_session(proto.SerializeToString()).run(None, {'x': x})[0].astype(np.float64)
    exact = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert np.all(np.isfinite(y)) and y[-4] == 0.0 and y[-1] == 1.0
    normal = exact > 1e-30  # float32 normal range
    relative = np.abs(y[normal] - exact[normal]) / exact[normal]
    torch_relative = np.abs(torch.sigmoid(torch.from_numpy(x)).double().numpy()[normal] - exact[normal]) / exact[normal]
    assert relative.max() < 4 * 2.0**-24 and relative.max() <= 2 * torch_relative.max()


def test_int4_and_tensorrt_forms(tmp_path):
    net = calibrated(tiny('EDSR'), **DEPLOYABLE)
    deployed, _ = to_deploy(net)
    example, x = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16)
    paths = {k: str(tmp_path / f'{k}.onnx') for k in ('int8', 'int4', 'tensorrt')}
    export_onnx(deployed, paths['int8'], example)
    export_onnx(deployed, paths['int4'], example, weight_format='int4')
    trt = export_onnx(deployed, paths['tensorrt'], example, target='tensorrt')
    import onnx
    from onnx import TensorProto
    init = {i.name: i for i in onnx.load(paths['int4']).graph.initializer}
    assert init['body.0.conv1.weight_quantized'].data_type == TensorProto.INT4
    assert os.path.getsize(paths['int4']) < os.path.getsize(paths['int8'])
    trt_init = {i.name: i for i in onnx.load(paths['tensorrt']).graph.initializer}
    zero_points = [onnx.numpy_helper.to_array(t) for k, t in trt_init.items() if k.endswith('input_zero_point')]
    assert zero_points and all(z.dtype == np.int8 and int(z) == 0 for z in zero_points)
    outs = {k: run(create_session(p), x) for k, p in paths.items()}
    assert np.array_equal(outs['int8'], outs['int4'])  # the same weight values, stored smaller
    if not any(v.get('output_codes_cut') for v in trt['layers'].values()):
        assert psnr(torch.from_numpy(outs['tensorrt']), torch.from_numpy(outs['int8'])) > 60
    midrise = to_deploy(calibrated(tiny('EDSR'), act_grid='aligned', weight_grid='midrise'))[0]
    with pytest.raises(DeployError, match='int4'):
        export_onnx(midrise, str(tmp_path / 'x.onnx'), example, weight_format='int4')


def test_refuses_fp_uncalibrated_and_unexpressible_networks(tmp_path):
    with pytest.raises(DeployError, match='no quantized layers'):
        to_deploy(build_network(tiny('EDSR')))
    fresh = build_network(dict(type='Quantized', arch=tiny('EDSR'), w_bits=4, a_bits=4))
    with pytest.raises(DeployError, match='not calibrated'):
        to_deploy(fresh)
    half = calibrated(tiny('EDSR'), layers=['body.0.conv1'])
    half.body[0].conv1.act_quant = None
    with pytest.raises(DeployError, match='full-precision activations'):
        to_deploy(half)
    swin = calibrated(tiny('SwinIR'), size=16, act_grid='aligned', weight_grid='midtread')
    deployed, _ = to_deploy(swin)
    with pytest.raises(DeployError, match='linear layers'):
        export_onnx(deployed, str(tmp_path / 's.onnx'), torch.rand(1, 3, 16, 16), exporter='torchscript')
    with pytest.warns(UserWarning, match='float arithmetic'):
        report = export_onnx(deployed, str(tmp_path / 's.onnx'), torch.rand(1, 3, 16, 16), exporter='torchscript',
                             allow_float=True)
    assert len(report['float_layers']) == 8
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert psnr(torch.from_numpy(run(create_session(str(tmp_path / 's.onnx')), x)), deployed(x)) > 60
    with pytest.raises(FileNotFoundError):
        load(str(tmp_path / 'missing.safetensors'))
    from safetensors.torch import save_file
    save_file({'w': torch.zeros(2)}, str(tmp_path / 'other.safetensors'))
    with pytest.raises(DeployError, match='not an odm-basicsr deployed model'):
        load(str(tmp_path / 'other.safetensors'))


# ---------------------------------------------------------------------------------------------------- odm-export
def _benchmark(root, scale=2, n=2):
    rng = np.random.default_rng(0)
    for d in ('HR', f'LRbicx{scale}'):
        os.makedirs(os.path.join(root, 'Tiny', d), exist_ok=True)
    for i in range(n):
        hr = rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)
        cv2.imwrite(os.path.join(root, 'Tiny', 'HR', f'im{i}.png'), hr)
        cv2.imwrite(os.path.join(root, 'Tiny', f'LRbicx{scale}', f'im{i}.png'), cv2.resize(hr, (14, 12)))
    return root


def _checkpoint(tmp_path, **options):
    import yaml

    net_opt = dict(type='Quantized', arch=tiny('EDSR'), w_bits=4, a_bits=4, **options)
    net = calibrated(net_opt['arch'], **options)
    torch.save({'params': net.state_dict()}, tmp_path / 'net.pth')
    (tmp_path / 'net.yml').write_text(yaml.safe_dump(dict(scale=2, network_g=net_opt)))
    return str(tmp_path / 'net.yml'), str(tmp_path / 'net.pth')


def test_odm_export_cli(tmp_path, capsys):
    from odm_basicsr.export import main

    opt, ckpt = _checkpoint(tmp_path, act_grid='aligned', weight_grid='midtread')  # no output quantizers trained
    data = _benchmark(str(tmp_path / 'bench'))
    out = str(tmp_path / 'out')
    main(['-opt', opt, '--checkpoint', ckpt, '--out', out, '--data', data, '--sets', 'Tiny', '--calib',
          os.path.join(data, 'Tiny', 'LRbicx2'), '--latency-size', '16'])
    report = json.load(open(os.path.join(out, 'export.json')))
    assert report['compact_reload_bit_identical'] is True
    assert report['added_output_quantizers'] == ['body.0.conv2', 'body.1.conv2']
    assert report['onnxruntime']['integer_convs'] == 4 == report['onnxruntime']['quantized_convs']
    p = report['parity']['Tiny']
    assert p['images'] == 2 and p['ort_vs_deploy_within_1'] > 0.99
    # the float noise floor: the same network in float64; no code moves on these tiny images
    assert p['float_floor_psnr'] > 90 and p['float_floor_within_1'] == 1.0
    assert report['sizes']['compact'] < report['sizes']['fp32_checkpoint']
    assert 'integer convs (QLinearConv)' in capsys.readouterr().out
    for name in ('model.safetensors', 'model.onnx', 'model_float.onnx', 'export.md'):
        assert os.path.isfile(os.path.join(out, name))


def test_odm_export_reads_the_export_section_and_flags_override_it(tmp_path, capsys):
    """The option file's ``export`` section sets what the flags would (validated strictly, with a hint for a
    misspelt key, also by odm-train's option check); a flag given overrides it."""
    import yaml

    from odm_basicsr.export import main
    from odm_basicsr.utils.option_check import check_options
    from odm_basicsr.utils.schema import OptionError

    opt, ckpt = _checkpoint(tmp_path, act_grid='aligned', weight_grid='midtread')
    data = _benchmark(str(tmp_path / 'bench'))
    options = yaml.safe_load(open(opt))
    options['export'] = dict(data=data, sets='Tiny', calib=os.path.join(data, 'Tiny', 'LRbicx2'), fp16=True,
                             onnx=False, latency_size=0)
    (tmp_path / 'net.yml').write_text(yaml.safe_dump(options))
    main(['-opt', opt, '--checkpoint', ckpt, '--out', str(tmp_path / 'a')])
    report = json.load(open(tmp_path / 'a' / 'export.json'))
    assert report['export_options']['sets'] == ['Tiny'] and report['sizes']['compact_float_dtype'] == 'float16'
    assert 'onnxruntime' not in report and report['parity']['Tiny']['images'] == 2
    assert not os.path.exists(tmp_path / 'a' / 'model.onnx')
    main(['-opt', opt, '--checkpoint', ckpt, '--out', str(tmp_path / 'b'), '--onnx', '--no-fp16'])
    report = json.load(open(tmp_path / 'b' / 'export.json'))
    assert report['export_options']['onnx'] is True and report['sizes']['compact_float_dtype'] == 'float32'
    assert report['onnxruntime']['integer_convs'] == 4
    capsys.readouterr()
    options['export'] = dict(fp61=True)
    (tmp_path / 'net.yml').write_text(yaml.safe_dump(options))
    with pytest.raises(SystemExit) as e:
        main(['-opt', opt, '--checkpoint', ckpt, '--out', str(tmp_path / 'c')])
    assert e.value.code == 2 and '"export.fp61"' in capsys.readouterr().err
    with pytest.raises(OptionError, match='fp16'):
        check_options(dict(options, name='x', model_type='QuantSRModel'))
    options['export'] = dict(format='int4', onnx=False)
    (tmp_path / 'net.yml').write_text(yaml.safe_dump(options))
    with pytest.raises(SystemExit):
        main(['-opt', opt, '--checkpoint', ckpt, '--out', str(tmp_path / 'd')])
    assert 'int4 is a format of the ONNX model' in capsys.readouterr().err


def test_odm_export_errors(tmp_path, capsys):
    from odm_basicsr.export import main

    opt, ckpt = _checkpoint(tmp_path)
    fp = tmp_path / 'fp.pth'
    torch.save({'params': build_network(tiny('EDSR')).state_dict()}, fp)
    cases = [
        (['--checkpoint', str(tmp_path / 'nope.pth')], 'checkpoint file not found'),
        (['--checkpoint', str(fp)], 'an FP checkpoint'),
        (['--checkpoint', ckpt], '--calib'),  # output quantizers to add, no images to calibrate them on
        (['--checkpoint', ckpt, '--data', str(tmp_path / 'nowhere')], 'benchmark folder not found'),
        (['--checkpoint', ckpt, '--calib', str(tmp_path / 'nowhere')], 'calibration folder not found'),
        (['--checkpoint', ckpt, '--latency-size', '-3'], 'expected an integer >= 0, got -3'),
        (['--checkpoint', ckpt, '--scale', '3'], 'the network upscales by 2, not 3 (--scale)'),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            main(['-opt', opt, '--out', str(tmp_path / 'o')] + extra)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize('name,bits', [('EDSR', 2), ('EDSR', 4), ('RLFN', 4)])
def test_deploy_form_is_the_trained_network_bit_for_bit(name, bits):
    """With the zero-aligned grid (the default), the int32 bias grid trained into QConv2d and the requantization
    into the next layer's grid, the deploy form computes exactly what the trained network computes."""
    net = calibrated(dict(tiny(name), num_feat=16), bits=bits, size=32, output_quant='auto')
    scale = net.quant_config['arch']['upscale']
    deployed, summary = to_deploy(net)
    assert summary['nudged'] == {}
    x = torch.rand(2, 3, 37, 29)
    with torch.no_grad():
        trained, deploy = net(x), deployed(x)
    assert trained.shape == (2, 3, 37 * scale, 29 * scale) and torch.equal(trained, deploy)


def test_float64_twin_keeps_the_integer_arithmetic():
    """Only the full-precision layers change arithmetic: the integer layers keep their float32 scales (and so their
    requantization), the original network is untouched, and the output is the deploy form's up to float rounding."""
    from odm_basicsr.deploy.integer_layers import float64_twin, integer_layers

    net = calibrated(dict(tiny('RLFN'), num_feat=16), bits=4, size=32, output_quant='auto')
    deployed, _ = to_deploy(net)
    twin = float64_twin(deployed)
    assert twin.fea_conv.weight.dtype == torch.float64 and deployed.fea_conv.weight.dtype == torch.float32
    for (_, a), (_, b) in zip(integer_layers(deployed), integer_layers(twin), strict=True):
        assert b.weight_scale.dtype == b.in_step.dtype == torch.float32 and torch.equal(a.weight_scale, b.weight_scale)
        assert torch.equal(a.weight_codes, b.weight_codes)
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        out, out64 = deployed(x), twin(x.double())
    assert out64.dtype == torch.float64 and psnr(out64.float(), out) > 100


def test_a_layer_whose_input_was_always_zero_deploys(tmp_path):
    """RCAN's channel attention, quantized with every layer: where the squeeze ReLU never fires on the calibration
    batches, the next conv's input range is the unit range (not a 1e-9-wide one whose int32 bias codes would
    overflow), and the network deploys, bit-identical to the trained one, and exports with every conv integer."""
    torch.manual_seed(0)
    net = build_network(dict(type='Quantized', arch=tiny('RCAN'), w_bits=4, a_bits=4, layers='all',
                             output_quant='auto')).eval()
    layers = dict(quantized_layers(net))
    squeeze, excite = 'body.0.residual_group.0.rcab.3.attention.1', 'body.0.residual_group.0.rcab.3.attention.3'
    with torch.no_grad():
        layers[squeeze].bias.fill_(-100.0)  # the squeeze conv's output is negative: its ReLU gives zeros
    calibrate(net, [torch.rand(2, 3, 24, 24)])
    assert [float(b.detach()) for b in layers[excite].act_quant.bounds()] == [0.0, 1.0]
    deployed, _ = to_deploy(net)
    x = torch.rand(1, 3, 20, 20)
    with torch.no_grad():
        assert torch.equal(net(x), deployed(x))
    path = str(tmp_path / 'm.onnx')
    export_onnx(deployed, path, torch.rand(1, 3, 32, 32))
    assert conv_kinds(path)['integer'] == len(layers)


class _PaddedNet(torch.nn.Module):
    """A quantized conv feeding, through a ReLU, a quantized conv with non-zero padding (exported as a Pad)."""

    def __init__(self, padding_mode='reflect', upscale=2):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 8, 3, 1, 1)
        self.a = torch.nn.Conv2d(8, 8, 3, 1, 1)
        self.b = torch.nn.Conv2d(8, 8, 3, 1, 1, padding_mode=padding_mode)
        self.c = torch.nn.Conv2d(8, 8, 1)
        self.tail = torch.nn.Conv2d(8, 3 * upscale**2, 3, 1, 1)
        self.shuffle = torch.nn.PixelShuffle(upscale)

    def forward(self, x):
        f = self.head(x)
        return self.shuffle(self.tail(self.c(torch.relu(self.b(torch.relu(self.a(f))))) + f))


@pytest.mark.parametrize('padding_mode', ['reflect', 'replicate', 'circular'])
@pytest.mark.parametrize('exporter', ['dynamo', 'torchscript'])
def test_a_conv_feeding_a_padded_conv_stays_integer(tmp_path, padding_mode, exporter):
    """The Pad of ``padding_mode`` is applied to the integer codes (exact for reflect / replicate / circular), so
    the conv in front of it still feeds a QuantizeLinear and runs as an integer conv."""
    from basicsr.utils.registry import ARCH_REGISTRY

    if '_PaddedNet' not in ARCH_REGISTRY:
        ARCH_REGISTRY.register(_PaddedNet)
    torch.manual_seed(0)
    net = build_network(dict(type='Quantized', arch=dict(type='_PaddedNet', padding_mode=padding_mode), w_bits=4,
                             a_bits=4, layers=['a', 'b', 'c'], output_quant='auto')).eval()
    calibrate(net, [torch.rand(2, 3, 24, 24)])
    deployed, _ = to_deploy(net)
    assert deployed.a.out_kind == 'next'  # requantized straight into b's grid
    path = str(tmp_path / 'm.onnx')
    report = export_onnx(deployed, path, torch.rand(1, 3, 32, 32), exporter=exporter)
    # TorchScript writes circular padding as Slice / Concat, not Pad: the conv in front of it stays a float conv
    sliced = (exporter, padding_mode) == ('torchscript', 'circular')
    assert conv_kinds(path)['integer'] == 3 - sliced and report['relus_absorbed'] == 2 - sliced
    x = torch.rand(1, 3, 19, 23)
    with torch.no_grad():
        assert torch.equal(net(x), deployed(x))
        assert psnr(torch.from_numpy(run(create_session(path), x)), deployed(x)) > 100
