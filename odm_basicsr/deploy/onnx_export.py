"""ONNX export of a deploy-form network, with its quantized convolutions in integer form.

``torch.onnx.export`` cannot write low-bit quantization (it only turns 8-bit fake quantization into
``QuantizeLinear``/``DequantizeLinear`` and keeps weights as float initializers), so the graph is written in two steps:

1. the deploy form's **float twin** is exported by PyTorch (every :class:`IntegerConv2d` becomes a plain ``Conv`` whose
   initializers ``<layer>.weight`` / ``<layer>.bias`` hold the dequantized weights, behind its offset's float ``Sub`` /
   ``Div``); that graph, with the input and output names ``lq`` / ``sr``, dynamic batch, height and width, is also
   the FP32 reference for latency;
2. :func:`quantize_graph` rewrites each such ``Conv`` (found by its weight initializer's name) into the **QCDQ** form
   that onnxruntime's CPU provider fuses into an integer ``QLinearConv``:

   * input: ``QuantizeLinear(uint8, step_in, zp) -> Clip(zp + low, zp + low + 2**b - 1) -> DequantizeLinear``: the
     b-bit codes in an 8-bit container (onnxruntime fuses only 8-bit types); a ``Relu`` in front is absorbed by
     raising the clip's lower code to ``zp`` (0 is on the grid, so that is exact);
   * weight: int8 initializer (zero point 0, per-output-channel scale, ``axis=0``) and ``DequantizeLinear``; with
     ``weight_format='int4'`` an int4 initializer instead (half the bytes; onnxruntime then runs a float conv);
   * bias: int32 initializer on the scale ``step_in * weight_scale`` and ``DequantizeLinear``;
   * output (layers with an output quantizer): ``QuantizeLinear(uint8) -> DequantizeLinear`` after the ``Conv``; a
     layer that feeds one integer layer gets nothing here: onnxruntime fuses the consumer's input quantizer into it.

``target='tensorrt'`` writes every activation grid with an int8 container and zero point 0, the only form TensorRT
takes: a b-bit grid ``step * (low .. low + 2**b - 1)`` is the int8 grid restricted to those codes (needs
``-128 <= low <= 127 - (2**b - 1)``); an 8-bit output grid is restricted to ``[-128, 127]`` (reported).

Needs ``onnx`` (and ``onnxscript`` for PyTorch's default exporter); not imported by ``odm_basicsr.deploy``.
"""
import copy
import warnings

import numpy as np
import torch
from torch import nn

from .convert import DeployError
from .integer_layers import IntegerConv2d, IntegerLinear, integer_layers

INPUT_NAME, OUTPUT_NAME = 'lq', 'sr'
OPSET = 21
TARGETS = ('onnxruntime', 'tensorrt')
WEIGHT_FORMATS = ('int8', 'int4')
EXPORTERS = ('auto', 'dynamo', 'torchscript')


class _FloatConv2d(nn.Conv2d):
    """The float twin of an :class:`IntegerConv2d`: its offset pre-processing, then a float conv with the
    dequantized weight and bias (the quantizers are added to the ONNX graph afterwards)."""

    def __init__(self, layer):
        out_channels, in_per_group, kh, kw = layer.weight_codes.shape
        super().__init__(in_per_group * layer.groups, out_channels, (kh, kw), stride=layer.stride,
                         padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                         bias=layer.bias_codes is not None, padding_mode=layer.padding_mode)
        with torch.no_grad():
            self.weight.copy_(layer.dequantized_weight())
            if self.bias is not None:
                self.bias.copy_(layer.dequantized_bias())
        self.pre = layer.pre
        self.register_buffer('pre_param', None if layer.pre_param is None else layer.pre_param.clone())

    def forward(self, x):
        if self.pre == 'shift':
            x = x - self.pre_param.view(1, -1, 1, 1)
        elif self.pre == 'scale':
            x = x / self.pre_param.view(1, -1, 1, 1)
        return super().forward(x)


def float_twin(net):
    """A copy of the deploy form whose integer convolutions are float convolutions on the dequantized weights (no
    quantizers). Integer linear layers keep their float arithmetic (they are not rewritten)."""
    twin = copy.deepcopy(net).cpu().eval()
    modules = dict(twin.named_modules())
    for name, layer in integer_layers(twin):
        if isinstance(layer, IntegerConv2d):
            parent, _, child = name.rpartition('.')
            setattr(modules[parent] if parent else twin, child, _FloatConv2d(layer))
    return twin


def _onnxscript_available():
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def export_float(model, example, exporter='auto', opset=OPSET):
    """Export ``model`` (float) to an ``onnx.ModelProto`` with input ``lq`` and output ``sr``, dynamic batch, height
    and width.

    Args:
        model (nn.Module): In eval mode, on the CPU.
        example (Tensor): An input (N, C, H, W); H and W should be large enough for every arch guard (e.g. 32).
        exporter (str): ``'dynamo'`` (PyTorch's default ``torch.export`` exporter, needs ``onnxscript``),
            ``'torchscript'`` (the legacy tracer), or ``'auto'``: dynamo when ``onnxscript`` is installed, the
            tracer when it is not or when dynamo fails on the arch. Default: 'auto'.
        opset (int): ONNX opset of the result. Default: 21.
    """
    import onnx

    if exporter not in EXPORTERS:
        raise DeployError(f'exporter must be one of {list(EXPORTERS)}, got {exporter!r}')
    model = model.cpu().eval()
    example = example.float().cpu()
    if exporter in ('auto', 'dynamo') and (exporter == 'dynamo' or _onnxscript_available()):
        try:
            return precise_sigmoids(_export_dynamo(model, example, opset))
        except Exception as e:  # noqa: BLE001  (any failure of the tracer-free exporter)
            if exporter == 'dynamo':
                raise DeployError(f'torch.onnx.export (dynamo) failed: {" ".join(str(e).split())[:400]}') from e
            warnings.warn(f'the dynamo ONNX exporter failed ({type(e).__name__}); using the TorchScript exporter',
                          stacklevel=2)
    import io

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the legacy exporter's deprecation notices
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=min(opset, 20),
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: 'batch', 2: 'height', 3: 'width'},
                                        OUTPUT_NAME: {0: 'batch', 2: 'out_height', 3: 'out_width'}})
    proto = onnx.load_from_string(buf.getvalue())
    _set_opset(proto, opset)
    return precise_sigmoids(proto)


def precise_sigmoids(proto):
    """Rewrite every ``Sigmoid`` of ``proto`` (in place) as ``Reciprocal(1 + Exp(-x))``; returns ``proto``.

    onnxruntime's CPU ``Sigmoid`` has a small absolute but a large relative error where the output is small
    (measured: mean 2e-8 absolute on outputs of 3e-6..0.04, 200 times PyTorch's; up to 110 % relative below
    ``x = -15``), and a sigmoid gate (RLFN's ESA, RCAN's channel attention) multiplies that relative error into the
    features in front of the next input quantizer, where it moves codes across grid boundaries. Its ``Exp`` is
    as exact as PyTorch's, so the composition agrees with ``torch.sigmoid`` to one float32 rounding (bit for bit on
    about 96 % of inputs), at the cost of three cheap elementwise nodes. ``Exp`` overflows to ``inf`` below
    ``x = -88`` and the result is then exactly 0, as it should be within float32.
    """
    from onnx import helper, numpy_helper

    nodes = list(proto.graph.node)
    if not any(n.op_type == 'Sigmoid' and n.domain in ('', 'ai.onnx') for n in nodes):
        return proto
    one = 'odm_sigmoid_one'
    if one not in {i.name for i in proto.graph.initializer}:
        proto.graph.initializer.append(numpy_helper.from_array(np.array(1.0, dtype=np.float32), one))
    rewritten = []
    for k, node in enumerate(nodes):
        if node.op_type != 'Sigmoid' or node.domain not in ('', 'ai.onnx'):
            rewritten.append(node)
            continue
        x, y, tag = node.input[0], node.output[0], node.name or f'sigmoid_{k}'
        rewritten += [helper.make_node('Neg', [x], [f'{tag}_neg'], name=f'{tag}_neg'),
                      helper.make_node('Exp', [f'{tag}_neg'], [f'{tag}_exp'], name=f'{tag}_exp'),
                      helper.make_node('Add', [f'{tag}_exp', one], [f'{tag}_denominator'], name=f'{tag}_add'),
                      helper.make_node('Reciprocal', [f'{tag}_denominator'], [y], name=f'{tag}_reciprocal')]
    del proto.graph.node[:]
    proto.graph.node.extend(rewritten)
    return proto


def _export_dynamo(model, example, opset):
    from torch.export import Dim

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], optimize=True, verbose=False,
                                    dynamic_shapes=({0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC},))
    proto = program.model_proto
    _strip_metadata(proto)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if any(d.HasField('dim_value') for i, d in enumerate(dims) if i in (0, 2, 3)):
        raise DeployError('the exported input has a fixed size')
    return proto


def _strip_metadata(proto):
    """Drop the exporter's per-node and per-value provenance strings (about 100 kB on EDSR)."""
    graph = proto.graph
    for items in (graph.node, graph.value_info, graph.input, graph.output, graph.initializer):
        for item in items:
            del item.metadata_props[:]
            item.doc_string = ''
    del graph.metadata_props[:]
    del proto.metadata_props[:]


def _set_opset(proto, opset):
    for entry in proto.opset_import:
        if entry.domain in ('', 'ai.onnx'):
            entry.version = opset


# ------------------------------------------------------------------------------------------------ graph rewrite
def _container(target):
    """(numpy dtype, ONNX type, lowest, highest) of the activation containers."""
    from onnx import TensorProto

    if target == 'tensorrt':
        return np.int8, TensorProto.INT8, -128, 127
    return np.uint8, TensorProto.UINT8, 0, 255


def _zero_point(low, bits, target, layer_name, what):
    """Zero point and clip codes ``(zp, lo, hi)`` of the grid ``low .. low + 2**bits - 1`` in the target container;
    plus the number of codes the container cuts off (TensorRT output grids)."""
    _, _, cmin, cmax = _container(target)
    n = 2**bits - 1
    if target == 'tensorrt':
        zp = 0
    else:
        zp = min(max(-low, cmin), cmax - (low + n))  # 0 for ranges above zero; keeps every code in 0..255
    lo, hi = zp + low, zp + low + n
    cut = max(cmin - lo, 0) + max(hi - cmax, 0)
    if cut and what == 'input':
        raise DeployError(f'layer {layer_name!r}: input codes {low}..{low + n} do not fit the {target} container '
                          f'({cmin}..{cmax} with zero point {zp})')
    return zp, max(lo, cmin), min(hi, cmax), cut


class _Graph:
    """The graph's nodes as a Python list of standalone ``NodeProto`` (stable identities while rewriting), plus its
    initializers by name; :meth:`finish` writes the list back."""

    def __init__(self, proto):
        from onnx import NodeProto

        self.proto, self.graph = proto, proto.graph
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.nodes = []
        for n in self.graph.node:
            copy_ = NodeProto()
            copy_.CopyFrom(n)
            self.nodes.append(copy_)

    def add_initializer(self, name, array):
        from onnx import numpy_helper

        if name in self.initializers:
            raise DeployError(f'ONNX rewrite: initializer {name!r} exists already')
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        return name

    def drop_unused_initializers(self):
        used = {i for n in self.nodes for i in n.input} | {o.name for o in self.graph.output}
        for name in [k for k in self.initializers if k not in used]:
            self.graph.initializer.remove(self.initializers.pop(name))

    def insert(self, anchor, nodes, after=False):
        i = next(k for k, n in enumerate(self.nodes) if n is anchor) + (1 if after else 0)
        self.nodes[i:i] = nodes

    def consumers(self, value):
        return [n for n in self.nodes if value in n.input]

    def finish(self):
        del self.graph.node[:]
        self.graph.node.extend(self.nodes)


def _find_conv(g, name):
    weight = f'{name}.weight'
    convs = [n for n in g.nodes if n.op_type == 'Conv' and len(n.input) > 1 and n.input[1] == weight]
    if len(convs) != 1:
        raise DeployError(f'ONNX rewrite: no Conv node reads the initializer {weight!r} of integer layer {name!r} '
                          '(the exporter renamed or folded it); try exporter="torchscript"')
    return convs[0]


def _weight_array(layer, weight_format, name):
    codes = layer.weight_codes.numpy()
    if weight_format == 'int4':
        import ml_dtypes

        if layer.max_weight_code > 7:  # every code the grid can hold must fit -8..7
            raise DeployError(f'layer {name!r}: {layer.weight_bits}-bit {layer.weight_grid} weight codes '
                              f'(up to +-{layer.max_weight_code}) do not fit int4; --format int4 needs midtread '
                              'weights of at most 4 bits or midrise weights of at most 3 bits')
        return codes.astype(ml_dtypes.int4), np.zeros(codes.shape[0], dtype=ml_dtypes.int4)
    return codes.astype(np.int8), np.zeros(codes.shape[0], dtype=np.int8)


def _rewrite_conv(g, name, layer, target, weight_format, report):
    from onnx import helper

    conv = _find_conv(g, name)
    before, after = [], []
    # weight: integer codes, per-output-channel scale (one scale when the range is per layer), zero point 0
    codes, zeros = _weight_array(layer, weight_format, name)
    scale = layer.weight_scale.numpy().astype(np.float32)
    per_channel = not bool((scale == scale[0]).all())
    scale, zeros = (scale, zeros) if per_channel else (scale[:1].reshape(()), zeros[:1].reshape(()))
    axis = {'axis': 0} if per_channel else {}
    w_q = g.add_initializer(f'{name}.weight_quantized', codes)
    w_s = g.add_initializer(f'{name}.weight_scale', scale)
    w_z = g.add_initializer(f'{name}.weight_zero_point', zeros)
    before.append(helper.make_node('DequantizeLinear', [w_q, w_s, w_z], [f'{name}.weight_dq'],
                                   name=f'{name}/weight/DequantizeLinear', **axis))
    conv.input[1] = f'{name}.weight_dq'
    if layer.bias_codes is not None and len(conv.input) < 3:  # the exporter dropped an all-zero bias
        if bool(layer.bias_codes.any()):
            raise DeployError(f'ONNX rewrite: the Conv of integer layer {name!r} lost its bias')
    elif layer.bias_codes is not None:  # the bias input may be shared (deduplicated) by the exporter: not reused
        bias_scale = layer.bias_scale().numpy().astype(np.float32)
        b_q = g.add_initializer(f'{name}.bias_quantized', layer.bias_codes.numpy().astype(np.int32))
        b_s = g.add_initializer(f'{name}.bias_scale', bias_scale if per_channel else bias_scale[:1].reshape(()))
        b_z = g.add_initializer(f'{name}.bias_zero_point', np.zeros(codes.shape[0] if per_channel else (),
                                                                    dtype=np.int32))
        before.append(helper.make_node('DequantizeLinear', [b_q, b_s, b_z], [f'{name}.bias_dq'],
                                       name=f'{name}/bias/DequantizeLinear', **axis))
        conv.input[2] = f'{name}.bias_dq'
    # input: QuantizeLinear -> Clip -> DequantizeLinear
    dtype = _container(target)[0]
    zp, lo, hi, _ = _zero_point(layer.in_low, layer.in_bits, target, name, 'input')
    s = g.add_initializer(f'{name}.input_scale', np.array(layer.in_step.item(), dtype=np.float32))
    z = g.add_initializer(f'{name}.input_zero_point', np.array(zp, dtype=dtype))
    lo_name = g.add_initializer(f'{name}.input_low', np.array(lo, dtype=dtype))
    hi_name = g.add_initializer(f'{name}.input_high', np.array(hi, dtype=dtype))
    x = conv.input[0]
    quantize = [
        helper.make_node('QuantizeLinear', [x, s, z], [f'{name}.input_q'], name=f'{name}/input/QuantizeLinear'),
        helper.make_node('Clip', [f'{name}.input_q', lo_name, hi_name], [f'{name}.input_codes'],
                         name=f'{name}/input/Clip')]
    input_quantizer, input_clip = quantize
    codes_in = f'{name}.input_codes'
    pad = _own_pad(g, conv, x) if layer.padding_mode != 'zeros' else None
    if pad is not None:  # quantize before the Pad: its producer's output then feeds a QuantizeLinear (fusable)
        quantize[0].input[0] = pad.input[0]
        g.insert(pad, quantize)
        pad.input[0] = codes_in
        if len(pad.input) > 2 and pad.input[2]:  # a fill value (unused by reflect / edge / wrap) of the codes' type
            pad.input[2] = g.add_initializer(f'{name}.pad_value', np.array(0, dtype=dtype))
        codes_in = pad.output[0] = f'{name}.input_codes_padded'
        quantize = []
    before.extend(quantize + [helper.make_node('DequantizeLinear', [codes_in, s, z], [f'{name}.input_dq'],
                                               name=f'{name}/input/DequantizeLinear')])
    conv.input[0] = f'{name}.input_dq'
    entry = dict(input_zero_point=zp, input_codes=[lo, hi])
    # output: QuantizeLinear -> (Clip) -> DequantizeLinear (a requantization into the next layer's grid is that
    # layer's own input quantizer in the graph: onnxruntime fuses it into this conv)
    if layer.out_kind == 'own':
        zp, lo, hi, cut = _zero_point(layer.out_low, layer.out_bits, target, name, 'output')
        y = conv.output[0]
        conv.output[0] = f'{name}.output_float'
        s = g.add_initializer(f'{name}.output_scale', np.array(layer.out_step.item(), dtype=np.float32))
        z = g.add_initializer(f'{name}.output_zero_point', np.array(zp, dtype=dtype))
        after.append(helper.make_node('QuantizeLinear', [conv.output[0], s, z], [f'{name}.output_q'],
                                      name=f'{name}/output/QuantizeLinear'))
        codes_out = f'{name}.output_q'
        if cut or (lo, hi) != (_container(target)[2], _container(target)[3]):
            lo_name = g.add_initializer(f'{name}.output_low', np.array(lo, dtype=dtype))
            hi_name = g.add_initializer(f'{name}.output_high', np.array(hi, dtype=dtype))
            after.append(helper.make_node('Clip', [codes_out, lo_name, hi_name], [f'{name}.output_codes'],
                                          name=f'{name}/output/Clip'))
            codes_out = f'{name}.output_codes'
        after.append(helper.make_node('DequantizeLinear', [codes_out, s, z], [y],
                                      name=f'{name}/output/DequantizeLinear'))
        entry.update(output_zero_point=zp, output_codes=[lo, hi], output_codes_cut=cut)
    g.insert(conv, before)
    g.insert(conv, after, after=True)
    report[name] = entry
    return input_quantizer, input_clip


def _own_pad(g, conv, value):
    """The ``Pad`` node that produces ``value`` for ``conv`` alone (a ``padding_mode`` other than zeros, which
    the exporter writes as a ``Pad`` in front of the ``Conv``), or None."""
    pads = [n for n in g.nodes if n.op_type == 'Pad' and n.output[0] == value]
    if len(pads) != 1 or [id(n) for n in g.consumers(value)] != [id(conv)] or value in {o.name for o in g.graph.output}:
        return None
    return pads[0]


def _absorb_relus(g, input_quantizers):
    """Remove each ``Relu`` whose every consumer is an input ``QuantizeLinear`` written here: those read the
    ``Relu``'s input instead, and their ``Clip`` starts at the zero point. Returns the number removed."""
    from onnx import numpy_helper

    clips = {id(q): clip for q, clip in input_quantizers}
    outputs = {o.name for o in g.graph.output}
    removed = 0
    for relu in [n for n in g.nodes if n.op_type == 'Relu']:
        users = g.consumers(relu.output[0])
        if not users or relu.output[0] in outputs or any(id(q) not in clips for q in users):
            continue
        for q in users:
            clip = clips[id(q)]
            zp = numpy_helper.to_array(g.initializers[q.input[2]])
            lo = numpy_helper.to_array(g.initializers[clip.input[1]])
            clip.input[1] = g.add_initializer(clip.input[1] + '_after_relu', np.maximum(lo, zp).astype(lo.dtype))
            q.input[0] = relu.input[0]
        g.nodes.remove(relu)
        removed += 1
    return removed


def quantize_graph(proto, net, target='onnxruntime', weight_format='int8', allow_float=False):
    """Rewrite the float-twin graph of ``net`` (:func:`export_float` of :func:`float_twin`) in place into the
    integer form described in the module docstring.

    Args:
        allow_float (bool): Keep integer layers the writer cannot express as integer operators (linear layers) in
            float arithmetic, with a warning, instead of refusing. Default: False.

    Returns:
        dict: Per integer layer the container codes used, plus ``relus_absorbed`` and ``float_layers`` (integer
        layers left in float arithmetic).
    """
    from onnx import helper

    if target not in TARGETS:
        raise DeployError(f'target must be one of {list(TARGETS)}, got {target!r}')
    if weight_format not in WEIGHT_FORMATS:
        raise DeployError(f'weight_format must be one of {list(WEIGHT_FORMATS)}, got {weight_format!r}')
    unsupported = [n for n, m in integer_layers(net) if isinstance(m, IntegerLinear)]
    if unsupported and not allow_float:
        raise DeployError(f'the ONNX writer has no integer form for the quantized linear layers {unsupported[:6]}'
                          f'{" ..." if len(unsupported) > 6 else ""}; allow_float (odm-export --allow-float) keeps '
                          'them in float arithmetic (same results, no integer speed-up)')
    g = _Graph(proto)
    report, float_layers, quantizers = {}, [], []
    for name, layer in integer_layers(net):
        if isinstance(layer, IntegerLinear):
            float_layers.append(name)
            continue
        quantizers.append(_rewrite_conv(g, name, layer, target, weight_format, report))
    relus = _absorb_relus(g, quantizers)
    g.drop_unused_initializers()
    g.finish()
    _set_opset(proto, max(OPSET, *(e.version for e in proto.opset_import if e.domain in ('', 'ai.onnx'))))
    proto.producer_name = 'odm-basicsr'
    helper.set_model_props(proto, {'odm_basicsr.target': target, 'odm_basicsr.weight_format': weight_format})
    if float_layers:
        warnings.warn(f'integer layers kept in float arithmetic in the ONNX graph: {float_layers}', stacklevel=2)
    return dict(layers=report, relus_absorbed=relus, float_layers=float_layers)


def export_onnx(net, path, example, target='onnxruntime', weight_format='int8', exporter='auto', float_path=None,
                allow_float=False):
    """Write the integer ONNX model of a deploy-form network (and, with ``float_path``, its float twin).

    Args:
        net (nn.Module): The deploy form (:func:`odm_basicsr.deploy.to_deploy`).
        path (str): Output ``.onnx`` file.
        example (Tensor): An input for the exporter, (1, C, H, W) with H, W >= 32 or so.
        target (str): ``'onnxruntime'`` or ``'tensorrt'``. Default: 'onnxruntime'.
        weight_format (str): ``'int8'`` (fast in onnxruntime) or ``'int4'`` (smaller). Default: 'int8'.
        exporter (str): See :func:`export_float`. Default: 'auto'.
        float_path (str | None): Also write the float twin (FP32 reference) there.
        allow_float (bool): See :func:`quantize_graph`. Default: False.

    Returns:
        dict: The rewrite report of :func:`quantize_graph`.
    """
    import onnx

    proto = export_float(float_twin(net), example, exporter)
    if float_path:
        onnx.save(proto, float_path)
    report = quantize_graph(proto, net, target, weight_format, allow_float)
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    return report
