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
