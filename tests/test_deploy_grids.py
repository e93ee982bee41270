"""Integer grids of the deploy form: zero-aligned activations, midrise / midtread weights, output quantizers, bit
packing, and the QCDQ arithmetic checked against onnxruntime's own QuantizeLinear / Clip / DequantizeLinear."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from basicsr.archs import build_network
from odm_helpers import TINY

from odm_basicsr.deploy.compact import pack_bits, unpack_bits
from odm_basicsr.deploy.integer_layers import quantize_dequantize
from odm_basicsr.quant import calibrate, quantized_layers
from odm_basicsr.quant.fake_quant import aligned_grid, fake_quantize_aligned
from odm_basicsr.quant.float_outputs import float_output_layers
from odm_basicsr.quant.quantizers import ActQuantizer, WeightQuantizer, mse_symmetric_range

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_aligned_grid_by_hand():
    # [-1.3, 2.2] at 2 bits: step 3.5 / 3; -1.3 / step = -1.114 -> low -1: levels -step, 0, step, 2 step
    step, low = aligned_grid(torch.tensor(-1.3), torch.tensor(2.2), 2)
    assert step.item() == pytest.approx(3.5 / 3) and low.item() == -1
    x = torch.tensor([-5.0, -0.7, 0.0, 0.5, 0.6, 1.8, 9.0])
    q = fake_quantize_aligned(x, torch.tensor(-1.3), torch.tensor(2.2), 2)
    s = 3.5 / 3
    assert q.tolist() == pytest.approx([-s, -s, 0.0, 0.0, s, 2 * s, 2 * s])
    assert fake_quantize_aligned(torch.zeros(3), torch.tensor(-0.4), torch.tensor(3.0), 3).abs().max() == 0  # 0 exact
    # include_zero widens [1, 4] to [0, 4]: step 4/3, low 0
    step, low = aligned_grid(torch.tensor(1.0), torch.tensor(4.0), 2, include_zero=True)
    assert step.item() == pytest.approx(4 / 3) and low.item() == 0


def test_aligned_grid_gradients_pass_straight_through_inside():
    x = torch.linspace(-0.9, 1.9, 50, requires_grad=True)
    lower, upper = torch.tensor(-1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    fake_quantize_aligned(x, lower, upper, 3).sum().backward()
    assert torch.all(x.grad == 1)
    assert lower.grad is not None and upper.grad is not None and torch.isfinite(lower.grad + upper.grad)


def test_act_quantizer_aligned_grid_has_2b_levels_and_zero():
    q = ActQuantizer(3, init='minmax', grid='aligned')
    x = torch.randn(4, 8, 16, 16) * 3 + 0.7
    y = q(x)
    step, low = q.integer_grid()
    codes = y / step
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= low and codes.round().max() <= low + 7
    assert len(torch.unique(y)) <= 8


def test_weight_grids_levels_and_integer_codes():
    w = torch.randn(6, 4, 3, 3)
    for grid, expected_levels in (('midrise', {-3, -1, 1, 3}), ('midtread', {-1, 0, 1})):
        wq = WeightQuantizer(2, range_method='maxabs', grid=grid, granularity='channel')
        q = wq(w)
        codes, unit = wq.integer_codes(w)
        assert set(codes.unique().tolist()) <= expected_levels
        assert torch.allclose(q, codes.float() * unit.view(-1, 1, 1, 1), atol=1e-6)
        u = w.abs().amax(dim=(1, 2, 3))  # max |W| per channel: the extreme levels are +-u
        assert torch.allclose(q.abs().amax(dim=(1, 2, 3)), u, atol=1e-6)
    assert WeightQuantizer(4, grid='midrise').max_code == 15 and WeightQuantizer(4, grid='midtread').max_code == 7


def test_midtread_mse_range_matches_brute_force():
    torch.manual_seed(0)
    a = torch.randn(1, 500)
    u = mse_symmetric_range(a, 2, grid='midtread').item()
    candidates = torch.linspace(0.01, 1.0, 2000) * a.abs().max()

    def err(c):
        return ((torch.clamp(torch.round(a / c), -1, 1) * c - a) ** 2).sum()
    best = min(candidates, key=err)
    assert err(torch.tensor(u)) <= err(best) * 1.001


def test_pack_bits_by_hand_and_round_trip():
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_bits(torch.tensor([5, 7, 1]), 3).tolist() == [(5 | 7 << 3 | 1 << 6) & 255, 1 >> 2]
    for bits in range(1, 9):
        v = torch.randint(0, 2**bits, (1001,))
        packed = pack_bits(v, bits)
        assert packed.numel() == math.ceil(1001 * bits / 8)
        assert torch.equal(unpack_bits(packed, 1001, bits), v)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4]), 2)


def _qcdq_model(scale, zero_point, lo, hi, dtype):
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8
    inits = [numpy_helper.from_array(np.array(scale, np.float32), 's'),
             numpy_helper.from_array(np.array(zero_point, dtype), 'z'),
             numpy_helper.from_array(np.array(lo, dtype), 'lo'), numpy_helper.from_array(np.array(hi, dtype), 'hi')]
    nodes = [helper.make_node('QuantizeLinear', ['x', 's', 'z'], ['q']),
             helper.make_node('Clip', ['q', 'lo', 'hi'], ['c']),
             helper.make_node('DequantizeLinear', ['c', 's', 'z'], ['y'])]
    graph = helper.make_graph(nodes, 'qcdq', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [None])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, [None])], inits)
    del elem
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)])


@pytest.mark.parametrize('dtype', [np.uint8, np.int8])
def test_quantize_dequantize_is_onnxruntime_qcdq_bit_for_bit(dtype):
    import onnxruntime as ort

    step, low, bits = np.float32(0.37), -3, 3
    zp = 3 if dtype == np.uint8 else 0
    model = _qcdq_model(step, zp, zp + low, zp + low + 2**bits - 1, dtype)
    session = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
    ties = (np.arange(-8, 9) + 0.5) * step  # exact halves: round half to even on both sides
    x = np.concatenate([ties, np.random.default_rng(0).normal(0, 2, 5000)]).astype(np.float32)
    ort_y = session.run(None, {'x': x})[0]
    ours = quantize_dequantize(torch.from_numpy(x), torch.tensor(step), low, bits).numpy()
    assert np.array_equal(ort_y, ours)


def _tiny(arch, **options):
    return build_network(dict(type='Quantized', arch=dict(type=arch, **TINY[arch](2)), w_bits=4, a_bits=4, **options))


def test_float_output_layers_by_arch():
    # EDSR: conv1 -> ReLU -> conv2 (absorbed); conv2 -> residual add (float)
    assert float_output_layers(_tiny('EDSR'), torch.rand(1, 3, 16, 16)) == ['body.0.conv2', 'body.1.conv2']
    # RLFN: every quantized conv feeds a LeakyReLU
    net = _tiny('RLFN')
    assert float_output_layers(net, torch.rand(1, 3, 16, 16)) == [n for n, _ in quantized_layers(net)]
    # layers: all on EDSR: conv_after_body feeds the global skip add, the upsampler conv a pixel shuffle
    net = _tiny('EDSR', layers='all')
    assert float_output_layers(net, torch.rand(1, 3, 16, 16)) == [
        'body.0.conv2', 'body.1.conv2', 'conv_after_body', 'upsample.0']


def test_output_quant_options_build_calibrate_and_train():
    net = _tiny('EDSR', act_grid='aligned', weight_grid='midtread', output_quant='auto')
    outs = {n for n, m in quantized_layers(net) if m.out_quant is not None}
    assert outs == {'body.0.conv2', 'body.1.conv2'} and net.quant_config['output_layers'] == sorted(outs)
    assert all(not bool(m.out_quant.initialized) for n, m in quantized_layers(net) if n in outs)  # untouched by auto
    for mode in ('fp', 'sequential'):
        calibrate(net, [torch.rand(2, 3, 16, 16)], mode)
        for name in outs:
            q = dict(quantized_layers(net))[name].out_quant
            assert bool(q.initialized) and q.bits == 8 and q.lower.item() <= 0 <= q.upper.item()
    y = net(torch.rand(2, 3, 16, 16))
    y.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    explicit = _tiny('EDSR', output_quant=['body.*.conv1'])
    assert {n for n, m in quantized_layers(explicit) if m.out_quant is not None} == {'body.0.conv1', 'body.1.conv1'}


@pytest.mark.parametrize('options,message', [
    (dict(act_grid='nudged'), 'act_grid'), (dict(weight_grid='zero'), 'weight_grid'),
    (dict(output_quant='yes'), 'output_quant'), (dict(output_quant=['conv_first']), 'output_quant: pattern'),
    (dict(output_bits=32), 'output_bits'), (dict(output_bits=1), 'output_bits')])
def test_bad_deploy_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        _tiny('EDSR', **options)


def test_core_and_deploy_import_without_basicsr_cv2_scipy():
    """The quantization core, the ODM math, the guards and the deployment package import on their own."""
    code = ('import sys\n'
            'import odm_basicsr, odm_basicsr.quant, odm_basicsr.odm, odm_basicsr.guards, odm_basicsr.deploy\n'
            'import odm_basicsr.deploy.compact, odm_basicsr.quant.float_outputs\n'
            'bad = [m for m in ("basicsr", "cv2", "scipy", "onnx") if m in sys.modules]\n'
            'assert not bad, bad\n'
            'print("standalone-ok")\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and 'standalone-ok' in out.stdout, out.stderr


def test_integer_conv_requantizes_exactly_as_onnxruntime_qlinearconv():
    """The deploy form's requantized output (exact accumulator times a float32 multiplier, round half to even) is
    what onnxruntime's fused integer QLinearConv gives, bit for bit, on a layer of realistic size."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from odm_basicsr.deploy import IntegerConv2d

    rng = np.random.default_rng(0)
    layer = IntegerConv2d((32, 32, 3, 3), padding=(1, 1), weight_bits=4, weight_grid='midtread', in_bits=4, in_low=-3,
                          out_bits=8, out_low=-128, out_kind='own')
    with torch.no_grad():
        layer.weight_codes.copy_(torch.from_numpy(rng.integers(-7, 8, (32, 32, 3, 3))))
        layer.weight_scale.copy_(torch.from_numpy(rng.uniform(1e-3, 2e-2, 32).astype(np.float32)))
        layer.bias_codes.copy_(torch.from_numpy(rng.integers(-3000, 3000, 32)))
        layer.in_step.fill_(0.0731)
        layer.out_step.fill_(0.00917)
    f32 = np.float32
    arrays = {'s': f32(layer.in_step), 'z': np.uint8(3), 'lo': np.uint8(0), 'hi': np.uint8(15),
              'w': layer.weight_codes.numpy(), 'ws': layer.weight_scale.numpy(), 'wz': np.zeros(32, np.int8),
              'b': layer.bias_codes.numpy(), 'bs': layer.bias_scale().numpy(), 'bz': np.zeros(32, np.int32),
              'so': f32(layer.out_step), 'zo': np.uint8(128)}
    nodes = [helper.make_node('QuantizeLinear', ['x', 's', 'z'], ['q']),
             helper.make_node('Clip', ['q', 'lo', 'hi'], ['c']),
             helper.make_node('DequantizeLinear', ['c', 's', 'z'], ['xd']),
             helper.make_node('DequantizeLinear', ['w', 'ws', 'wz'], ['wd'], axis=0),
             helper.make_node('DequantizeLinear', ['b', 'bs', 'bz'], ['bd'], axis=0),
             helper.make_node('Conv', ['xd', 'wd', 'bd'], ['y'], pads=[1, 1, 1, 1]),
             helper.make_node('QuantizeLinear', ['y', 'so', 'zo'], ['yq']),
             helper.make_node('DequantizeLinear', ['yq', 'so', 'zo'], ['out'])]
    graph = helper.make_graph(nodes, 'qlinearconv', [helper.make_tensor_value_info('x', TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info('out', TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=['CPUExecutionProvider'])
    x = torch.from_numpy(rng.normal(0.3, 0.5, (2, 32, 20, 20)).astype(np.float32))
    ours = layer(x).detach().numpy()
    theirs = session.run(None, {'x': x.numpy()})[0]
    assert np.array_equal(ours, theirs)
    assert len(np.unique(ours)) > 100  # a real spread of output codes, not a saturated map
