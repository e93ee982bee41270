"""Cost report of an SR network: MACs, parameters, BitOPs and storage (METHOD.md section 7).

``odm-cost`` is :func:`~odm_basicsr.cost.cli.main`. The parts: :mod:`.tracer` counts the operations of a forward
pass, :mod:`.report` turns them into the report (what is counted and how: its docstring), :mod:`.text` prints it,
:mod:`.sizes` holds the output / input sizes and :class:`CostError`.
"""
from .cli import load_weights, main, report_from_options
from .report import NOT_COUNTED, cost_report, storage
from .sizes import DEFAULT_OUTPUT_SIZE, CostError, lr_size, parse_size
from .text import format_report
from .tracer import trace_ops

__all__ = ['DEFAULT_OUTPUT_SIZE', 'NOT_COUNTED', 'CostError', 'cost_report', 'format_report', 'load_weights',
           'lr_size', 'main', 'parse_size', 'report_from_options', 'storage', 'trace_ops']
