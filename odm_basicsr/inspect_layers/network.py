"""The images and the network ``odm-inspect`` looks at: a quantized checkpoint, or an FP one wrapped in
``Quantized`` and calibrated on the inspected images."""
import os

from odm_basicsr.archs.arch_util import pad_to_window
from odm_basicsr.network_options import build_network
from odm_basicsr.scoring import IMAGE_EXTS, image_files, load_weights, read_image, to_tensor
from odm_basicsr.tool_cli import ToolError

DEFAULT_BITS = 4


class InspectError(ToolError):
    """A user error: reported as one line, exit status 2."""


def list_images(data, scale):
    """Sorted image paths of ``data`` or, when it has one, of its ``LRbicx<scale>`` subfolder."""
    if not os.path.isdir(data):
        raise InspectError(f'data folder not found: {data}')
    sub = os.path.join(data, f'LRbicx{scale}')
    folder = sub if os.path.isdir(sub) else data
    names = image_files(folder)
    if not names:
        extra = f' (nor a subfolder LRbicx{scale})' if folder == data else ''
        raise InspectError(f'no images ({", ".join(IMAGE_EXTS)}) found in {folder}{extra}')
    return folder, [os.path.join(folder, f) for f in names]


def load_inputs(paths, device, window=None):
    """Each image as a (1, 3, H, W) RGB [0, 1] tensor on ``device`` (padded to the window as odm-eval does)."""
    return [pad_to_window(to_tensor(read_image(path)).to(device), window) for path in paths]


def is_quantized_opt(net_opt):
    return net_opt.get('type') == 'Quantized'


def prepare_network(net_opt, args, inputs):
    """The quantized network to inspect, and a dict describing how it was obtained."""
    from odm_basicsr.checkpoint import CheckpointMismatchError, load_state
    from odm_basicsr.quant import CalibrationError, calibrate, quantized_layers

    if is_quantized_opt(net_opt):
        given = [flag for flag, v in (('--bits', args.bits), ('--layers', args.layers)) if v is not None]
        if given:
            raise InspectError(f'{" and ".join(given)} only apply to a plain FP arch; network_g of {args.opt} is '
                               f'Quantized (w_bits={net_opt.get("w_bits", 4)}, a_bits={net_opt.get("a_bits", 4)}) '
                               'and its checkpoint carries the quantizer state')
        net = build_network(net_opt)
        try:
            key = load_weights(net, args.checkpoint, args.param_key)
        except ToolError as e:
            if 'no quantizer state' not in str(e):
                raise
            raise InspectError(f'{e} To inspect an FP checkpoint, give an option file with the plain FP arch '
                               '(and --bits).') from e
        return net, {'source': 'quantized checkpoint', 'param_key': key, 'calibrated_here': False}

    bits = DEFAULT_BITS if args.bits is None else args.bits
    layers = 'default' if args.layers is None else args.layers
    if isinstance(layers, list) and len(layers) == 1 and layers[0] in ('default', 'all'):
        layers = layers[0]
    fp = build_network(net_opt)
    try:
        key = load_weights(fp, args.checkpoint, args.param_key)
    except ToolError as e:
        hint = (' (a quantized checkpoint? inspect it with its Quantized option file)'
                if any(k in str(e) for k in ('act_quant', 'weight_quant', 'offset.')) else '')
        raise InspectError(f'{e}{hint}') from e
    q_opt = {'type': 'Quantized', 'arch': dict(net_opt), 'w_bits': bits, 'a_bits': bits, 'layers': layers}
    net = build_network(q_opt)
    try:
        load_state(net, fp.state_dict(), source=f'the FP weights of {net_opt["type"]}')
    except CheckpointMismatchError as e:
        raise InspectError(f'{e} (its Quantized wrapper)') from e
    del fp
    net.to(inputs[0].device).eval()
    try:
        calibrate(net, inputs, mode='fp')
    except (CalibrationError, ValueError) as e:
        raise InspectError(f'FP calibration failed: {e}') from e
    if not quantized_layers(net):
        raise InspectError(f'no quantized layer in {net_opt["type"]} with layers={layers!r}')
    return net, {'source': 'FP checkpoint, wrapped in Quantized and FP-calibrated on the inspected images',
                 'param_key': key, 'calibrated_here': True, 'bits': bits, 'layers': layers,
                 'quantized_opt': q_opt}
