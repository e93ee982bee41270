"""Conventions of the command-line tools (``odm-eval``, ``odm-cost``, ``odm-inspect``, ``odm-export``, the demo).

A user error is one line ``<prog>: error: <message>`` on stderr and exit status 2; a checkpoint holding NaN / Inf
exits with 3, as ``odm-train`` and ``odm-test`` do.
"""
import sys


class ToolError(Exception):
    """A user error: reported as one line, exit status :attr:`exit_status`."""

    exit_status = 2


class NonFiniteCheckpointError(ToolError):
    """A checkpoint with NaN / Inf values: reported as one line, exit status 3."""

    exit_status = 3


def one_line(text):
    """``text`` with every run of white space (newlines too) as one space."""
    return ' '.join(str(text).split())


def run_cli(prog, parser, run_fn, argv=None):
    """Parse ``argv`` and call ``run_fn(args)``; a :class:`ToolError` ends the program as described above."""
    args = parser.parse_args(argv)
    try:
        run_fn(args)
    except ToolError as e:
        print(f'{prog}: error: {one_line(e)}', file=sys.stderr)
        sys.exit(e.exit_status)
    return 0


def pick_device(name):
    """``torch.device`` of a ``--device`` value: ``auto`` (a GPU if there is one), ``cpu`` or ``cuda``."""
    import torch

    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise ToolError('--device cuda: CUDA is not available')
    return torch.device(name)
