"""``odm-inspect``: look inside a quantized network, layer by layer, on a folder of LR images.

``odm-inspect -opt NET.yml --checkpoint C.pth --data DIR [--out FOLDER] [--images N] [--bits B] [--layers ...]``

Two ways in:

- ``network_g`` is ``Quantized``: ``C.pth`` is a quantized checkpoint with calibrated activation ranges (as
  ``odm-train`` writes it: ``params_ema``, falling back to ``params``); distribution offsets are recreated from it.
- ``network_g`` is a plain FP arch: ``C.pth`` is its FP checkpoint; the network is wrapped in ``Quantized`` with
  ``--bits`` (weights and activations, default 4) and ``--layers`` (default ``default``, the arch's preset), then
  calibrated on the inspected images themselves (FP calibration, ``calibrate(net, batches, mode='fp')``).

``DIR`` is a folder of LR images, or a benchmark set root holding ``LRbicx<scale>``. Images are read as odm-eval
reads them (RGB, [0, 1]) and run one at a time, in full precision: weight quantizers and activation quantizers pass
through, so every statistic below describes the input each quantized layer gets from the FP network. The
quantizer state of the network is never changed.

Per quantized layer, in forward order (first call):

- FP input: min and max (exact) and the 0.1 / 1 / 50 / 99 / 99.9 percentiles. Percentiles are exact while a
  layer's inputs over all images hold at most ``--max-samples`` values (default 200 000); beyond that they come from
  a seeded uniform subsample of that size (deterministic; every value of every image equally likely), and
  ``layers.json`` says which (``percentile_sample``).
- The activation quantizer's range ``[lower, upper]`` and the fraction of the input it clips (exact counts). With a
  distribution offset the quantizer sees ``x - delta`` or ``x / rho`` and the range is in those units; clipping
  is counted there.
- Input SQNR ``10 log10(sum x^2 / sum (x - e(x))^2)`` with ``e`` the layer's ``effective_input`` (what the
  convolution sees, in the units of ``x``), and weight SQNR ``10 log10(sum W^2 / sum (W - Q_w(W))^2)`` (``W`` times
  ``rho`` for an unfolded scale offset, as the weight quantizer sees it). Exact sums in float64.
- Channel mismatch scores (``mismatch_scores``: shift ``std_c(mu_c) / mean_c(sigma_c)`` and scale
  ``std_c(sigma_c) / mean_c(sigma_c)``) and the input variance of FeatureVarianceLoss' ``channel`` reduction
  (mean over channels of the variance over all images' pixels, i.e. all images taken as one batch; exact).
  ``layers.json`` also has the mean over images of ``feature_variance(x, 'channel')`` per image.

Writes ``layers.md`` (also printed), ``layers.json`` (the numbers and the settings) and ``layers.png`` into
``--out`` (default ``inspect/<checkpoint stem>``). Errors exit with status 2 (3 for a checkpoint holding NaN / Inf)
and one line on stderr.

The parts: :mod:`.network` (the images and the network to inspect), :mod:`.statistics` (the per-layer numbers),
:mod:`.table` (Markdown and JSON), :mod:`.figure` (``layers.png``), :mod:`.cli` (the command line).
"""
from .cli import PROG, build_parser, main, run
from .network import DEFAULT_BITS, InspectError, list_images, load_inputs, prepare_network
from .statistics import MAX_SAMPLES, PERCENTILES, Subsample, full_precision, inspect_network, sqnr_db, weight_stats

__all__ = ['DEFAULT_BITS', 'MAX_SAMPLES', 'PERCENTILES', 'PROG', 'InspectError', 'Subsample', 'build_parser',
           'full_precision', 'inspect_network', 'list_images', 'load_inputs', 'main', 'prepare_network', 'run',
           'sqnr_db', 'weight_stats']
