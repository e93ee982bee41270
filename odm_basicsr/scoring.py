"""Scoring an SR network on an image set: the one evaluation path of ``odm-eval``, the demo and the studies.

The protocol of the SR-quantization papers, as BasicSR's validation computes it: each LR image (RGB in [0, 1]) runs
through the network on its own (padded to the window of a windowed arch, the output cropped back), the output is
rounded to 8 bit (``tensor2img``), and PSNR / SSIM are BasicSR's ``calculate_psnr`` / ``calculate_ssim`` on the Y
channel with ``crop_border = scale`` against the HR image cropped from the top left to the LR size times the scale
(as BasicSR's ``PairedImageDataset`` does outside training).

A *pair* is ``(name, lq, gt)``: ``lq`` a (1, C, h, w) float tensor, ``gt`` the 8-bit BGR HR image. Benchmark
folders are ``<root>/<Set>/HR/<name>.png`` and ``<root>/<Set>/LRbicx<scale>/<name>[x<scale>].png``.
"""
import os

from odm_basicsr.tool_cli import NonFiniteCheckpointError, ToolError

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


# ----------------------------------------------------------------------------------------------------------- images
def image_files(folder):
    """Sorted names of the image files in ``folder``."""
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(folder, f)))


def read_image(path):
    """8-bit image as a 3-channel BGR array (grey and alpha images converted)."""
    import cv2

    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ToolError(f'cannot read image {path}')
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    elif img.shape[2] == 1:
        img = cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    if img.dtype != 'uint8':
        raise ToolError(f'{path}: only 8-bit images are supported (got {img.dtype})')
    return img


def to_tensor(bgr):
    """An 8-bit BGR image as a (1, 3, H, W) RGB float tensor in [0, 1]."""
    from basicsr.utils import img2tensor

    return img2tensor(bgr.astype('float32') / 255.0, bgr2rgb=True, float32=True).unsqueeze(0)


def list_pairs(root, set_name, scale):
    """``[(name, lr_path, hr_path)]`` of one benchmark set; LR files may carry an ``x<scale>`` suffix."""
    if not os.path.isdir(root):
        raise ToolError(f'benchmark folder not found: {root}')
    set_dir = os.path.join(root, set_name)
    if not os.path.isdir(set_dir):
        avail = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise ToolError(f'unknown set {set_name!r}: folder not found: {set_dir} (available in {root}: '
                        f'{", ".join(avail) or "none"})')
    hr_dir, lr_dir = os.path.join(set_dir, 'HR'), os.path.join(set_dir, f'LRbicx{scale}')
    for d in (hr_dir, lr_dir):
        if not os.path.isdir(d):
            raise ToolError(f'folder not found: {d}')
    hrs, lrs = image_files(hr_dir), image_files(lr_dir)
    if len(hrs) != len(lrs):
        raise ToolError(f'{set_name}: {len(hrs)} HR images in {hr_dir} but {len(lrs)} LR images in {lr_dir}')
    if not hrs:
        raise ToolError(f'{set_name}: no images in {hr_dir}')
    lr_by_stem = {os.path.splitext(f)[0]: f for f in lrs}
    pairs = []
    for f in hrs:
        stem = os.path.splitext(f)[0]
        lr = lr_by_stem.get(stem) or lr_by_stem.get(f'{stem}x{scale}')
        if lr is None:
            raise ToolError(f'{set_name}: no LR image for {os.path.join(hr_dir, f)} in {lr_dir}')
        pairs.append((stem, os.path.join(lr_dir, lr), os.path.join(hr_dir, f)))
    return pairs


def load_pair(name, lr_path, hr_path, scale):
    """The pair ``(name, lq, gt)`` of two files; ``gt`` cropped from the top left to the LR size times ``scale``."""
    lr, hr = read_image(lr_path), read_image(hr_path)
    h, w = lr.shape[0] * scale, lr.shape[1] * scale
    if hr.shape[0] < h or hr.shape[1] < w:
        raise ToolError(f'{hr_path} ({hr.shape[1]}x{hr.shape[0]}) is smaller than {lr_path} x{scale}')
    return name, to_tensor(lr), hr[:h, :w]


def iter_pairs(path_pairs, scale):
    """:func:`load_pair` of each ``(name, lr_path, hr_path)``, one at a time (a large set never sits in memory)."""
    for name, lr_path, hr_path in path_pairs:
        yield load_pair(name, lr_path, hr_path, scale)


def load_benchmark(root, set_name, scale):
    """Every pair of one benchmark set, loaded (for small sets that several networks are scored on)."""
    return list(iter_pairs(list_pairs(root, set_name, scale), scale))


# ------------------------------------------------------------------------------------------------------ inference
def super_resolve(net, lq, scale, window=None):
    """SR of one LR tensor (on the network's device) as an 8-bit BGR image."""
    import torch
    from basicsr.utils import tensor2img

    from odm_basicsr.archs.arch_util import pad_to_window

    h, w = lq.shape[-2:]
    with torch.no_grad():
        out = net(pad_to_window(lq, window))
    out = out[..., :h * scale, :w * scale]
    if out.shape[-2:] != (h * scale, w * scale):
        raise ToolError(f'network output {tuple(out.shape[-2:])} for an LR of {(h, w)} is not x{scale}: does the '
                        'scale match the network\'s upscale?')
    return tensor2img([out.detach().float().cpu()])


def _pair_scale(pair):
    _, lq, gt = pair
    return gt.shape[0] // lq.shape[-2]


def sr_images(net, pairs, device, scale=None, window=None):
    """The 8-bit BGR SR image of each pair (``scale`` None: read off the pair's sizes)."""
    return [super_resolve(net, p[1].to(device), scale or _pair_scale(p), window) for p in pairs]


def bicubic_images(pairs, scale):
    """MATLAB-bicubic upscaling of each pair's LR image (BasicSR's ``imresize``), as 8-bit BGR images."""
    from basicsr.utils import img2tensor, tensor2img
    from basicsr.utils.matlab_functions import imresize

    out = []
    for _, lq, _ in pairs:
        up = imresize(lq[0].permute(1, 2, 0).numpy(), scale)
        out.append(tensor2img([img2tensor(up, bgr2rgb=False, float32=True).unsqueeze(0)]))
    return out


# -------------------------------------------------------------------------------------------------------- metrics
def y_psnr(sr, gt, scale):
    """PSNR of one 8-bit SR image: Y channel, border ``scale``, BasicSR's ``calculate_psnr``."""
    from basicsr.metrics import calculate_psnr

    return float(calculate_psnr(sr, gt, crop_border=scale, test_y_channel=True))


def score(sr, gt, scale):
    """``(psnr, ssim)`` of one 8-bit SR image: Y channel, border ``scale``, BasicSR's metric functions."""
    from basicsr.metrics import calculate_ssim

    return y_psnr(sr, gt, scale), float(calculate_ssim(sr, gt, crop_border=scale, test_y_channel=True))


def score_images(images, pairs, scale):
    """Per-image ``[(name, psnr, ssim)]`` of SR images against their pairs' HR images."""
    return [(name, *score(img, gt, scale)) for img, (name, _, gt) in zip(images, pairs)]


def evaluate_pairs(net, pairs, scale, device, window=None, save_dir=None):
    """Per-image ``[(name, psnr, ssim)]`` of ``net`` on ``pairs`` (any iterable); ``save_dir``: also the PNGs."""
    import cv2

    rows = []
    for name, lq, gt in pairs:
        sr = super_resolve(net, lq.to(device), scale, window)
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
            cv2.imwrite(os.path.join(save_dir, f'{name}.png'), sr)
        rows.append((name, *score(sr, gt, scale)))
    return rows


def evaluate_set(net, path_pairs, scale, device, window=None, save_dir=None):
    """:func:`evaluate_pairs` on the ``(name, lr_path, hr_path)`` of :func:`list_pairs`, read one at a time."""
    return evaluate_pairs(net, iter_pairs(path_pairs, scale), scale, device, window, save_dir)


def mean_scores(rows):
    """``{'psnr', 'ssim'}`` means of per-image rows, and ``per_image_psnr`` (rounded to 4 decimals)."""
    return {'psnr': sum(r[1] for r in rows) / len(rows), 'ssim': sum(r[2] for r in rows) / len(rows),
            'per_image_psnr': {name: round(psnr, 4) for name, psnr, _ in rows}}


# -------------------------------------------------------------------------------------------------------- weights
def load_weights(net, path, param_key='params_ema'):
    """Load a checkpoint into the network to be scored: strictly, refusing NaN / Inf and uncalibrated quantizers.

    ``param_key`` falls back to ``params``, then to a bare state dict. Returns the entry used (None: bare).
    """
    from odm_basicsr import checkpoint
    from odm_basicsr.guards import NonFiniteError

    try:
        return checkpoint.load_weights(net, path, param_key, 'params', strict=True,
                                       finite='refusing to evaluate it', calibrated=True).key
    except NonFiniteError as e:
        raise NonFiniteCheckpointError(str(e)) from e
    except checkpoint.CheckpointError as e:
        raise ToolError(str(e)) from e


def load_network(net_opt, path, device, param_key='params_ema'):
    """``network_g`` built (:mod:`odm_basicsr.network_options`) with the weights of ``path`` (:func:`load_weights`),
    on ``device``, in eval mode."""
    from odm_basicsr.network_options import build_network

    net = build_network(net_opt)
    load_weights(net, path, param_key)
    return net.to(device).eval()
