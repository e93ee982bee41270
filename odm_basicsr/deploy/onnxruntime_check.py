"""Run an exported model in onnxruntime (CPU provider) and see what it runs: integer or float convolutions.

Needs ``onnxruntime`` and ``onnx`` (the ``deploy`` extra).
"""
import os
import tempfile
import time

import numpy as np

#: Operators of onnxruntime's optimized graphs that run a convolution in integer arithmetic / in float.
INTEGER_CONV_OPS = ('QLinearConv', 'ConvInteger')
FLOAT_CONV_OPS = ('Conv', 'FusedConv')


def create_session(path, threads=1, optimized_path=None):
    """An ``InferenceSession`` on the CPU provider with all graph optimizations, ``threads`` intra-op threads
    (1 by default: reproducible timings), writing the optimized graph to ``optimized_path`` when given."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the optimized-graph notice is expected
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def conv_kinds(path):
    """Convolutions in onnxruntime's optimized graph of the model at ``path``.

    Returns:
        dict: ``integer`` / ``float`` (counts) and ``ops`` (count per operator type of the optimized graph).
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, 'optimized.onnx')
        create_session(path, optimized_path=optimized)
        graph = onnx.load(optimized).graph
    ops = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return dict(integer=sum(ops.get(o, 0) for o in INTEGER_CONV_OPS),
                float=sum(ops.get(o, 0) for o in FLOAT_CONV_OPS), ops=ops)


def run(session, x):
    """The model's output for ``x`` (a tensor or array, (N, C, H, W) float32) as a float32 array."""
    x = x.detach().cpu().numpy() if hasattr(x, 'detach') else np.asarray(x)
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.astype(np.float32)})[0]


def median_latency(session, x, repeats=5):
    """Median wall time in seconds of ``repeats`` runs of ``session`` on ``x`` (after one warm-up run)."""
    run(session, x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(session, x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def code_agreement(deployed, path, x):
    """Per integer layer, the share of its input codes on which onnxruntime and the deploy form agree.

    Low-bit networks amplify: one input code that float rounding moves across a grid boundary (in a float layer
    before it, computed in another order by onnxruntime) changes many codes downstream. This finds the first layer
    where the two differ and by how much, which tells a real export error (codes differ from the first layer on)
    from rounding (exact agreement, then a few codes, then more).

    Args:
        deployed (nn.Module): The deploy form.
        path (str): Its ONNX model (written by ``export_onnx``).
        x (Tensor): One input.

    Returns:
        dict[str, dict]: Layer -> ``{'differ': fraction of codes that differ, 'max_steps': largest difference}``.
    """
    import onnx
    import torch

    from .integer_layers import IntegerConv2d, integer_layers

    model = onnx.load(path)
    layers = [(n, m) for n, m in integer_layers(deployed) if isinstance(m, IntegerConv2d)]
    for name, _ in layers:
        model.graph.output.append(onnx.helper.make_tensor_value_info(f'{name}.input_dq', onnx.TensorProto.FLOAT,
                                                                     None))
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, 'probe.onnx')
        onnx.save(model, probe)
        session = create_session(probe)
        names = [o.name for o in session.get_outputs()]
        x_np = x.detach().cpu().numpy().astype(np.float32)
        outputs = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x_np})))
    seen, handles = {}, []

    def record(name):
        def hook(module, args):
            seen.setdefault(name, module.quantized_input(args[0]).detach().numpy())  # returns None: input unchanged
        return hook

    for name, layer in layers:
        handles.append(layer.register_forward_pre_hook(record(name)))
    try:
        with torch.no_grad():
            deployed(x)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name, layer in layers:
        diff = np.abs(outputs[f'{name}.input_dq'] - seen[name]) / layer.in_step.item()
        result[name] = dict(differ=float(np.mean(diff > 0.5)), max_steps=int(np.round(diff.max())))
    return result
