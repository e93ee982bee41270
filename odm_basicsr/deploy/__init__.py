"""Deployment: the integer deploy form of a trained network, its compact file and its ONNX export.

``odm_basicsr.deploy`` is plain PyTorch: it imports neither BasicSR nor onnx. The ONNX writer
(:mod:`odm_basicsr.deploy.onnx_export`) and the onnxruntime checks need the ``deploy`` extra
(``pip install "odm-basicsr[deploy]"``).
"""
from .compact import load, round_float_layers, save
from .convert import DeployError, to_deploy
from .integer_layers import IntegerConv2d, IntegerLinear, integer_layers, quantize_dequantize

__all__ = ['DeployError', 'IntegerConv2d', 'IntegerLinear', 'integer_layers', 'load', 'quantize_dequantize',
           'round_float_layers', 'save', 'to_deploy']
