#!/usr/bin/env python
"""Make a benchmark set (Set5, Set14, B100, Urban100, ...) in BasicSR's layout from a folder of HR images.

Usage::

    python scripts/prepare_benchmark.py path/to/Urban100_HR_images datasets/Urban100 [--scales 2 3 4]

Output::

    <out>/HR/<name>.png            the HR images as they are (PNG; pixels unchanged)
    <out>/GTmod12/<name>.png       HR cropped (bottom/right) to a multiple of 12, as BasicSR's MATLAB script
    <out>/LRbicx{s}/<name>.png     MATLAB-compatible bicubic (``basicsr.utils.matlab_functions.imresize``,
                                   antialiased) of the HR cropped to a multiple of s, rounded to uint8

By default (``--lr-from hr``) the LR images follow the widely used benchmark files (SelfExSR's release, the
files the SR-quantization papers evaluate on, and ``../shared/data/benchmark``): an LR image at scale s is made
from the HR image cropped to a multiple of s and pairs with the top-left ``(h_LR * s, w_LR * s)`` of the HR
image, which is what ``PairedImageDataset`` crops outside training. So use ``dataroot_gt: <out>/HR`` with
``dataroot_lq: <out>/LRbicx4``. ``GTmod12`` pairs with these LR images only where the HR size is a multiple of
12 already: BasicSR's own MATLAB script (``generate_bicubic_img.m``) makes the LR images from GTmod12 instead,
which ``--lr-from gtmod`` reproduces (then GTmod12 and LRbicx{s} pair exactly, and the LR images differ from the
standard ones wherever the HR size is not a multiple of 12).

Greyscale images stay greyscale (BasicSR reads them with colour conversion); an alpha channel is dropped. The
input folder may be ``<out>/HR`` itself (then only GTmod12 and the LR folders are written).

Check the result with ``python scripts/check_dataset.py <out>``.
"""
# ruff: noqa: I001
import odm_basicsr.archs  # noqa: F401  (BasicSR fixes + registration first)

import argparse
import os
import shutil
import sys

import cv2
import numpy as np
from basicsr.utils.matlab_functions import imresize

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


class PrepareError(RuntimeError):
    """A problem with the input; the message names the file."""


def list_images(folder):
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith('.'))


def read_hr(path):
    """``(image, as_stored)``: the 8-bit image as HxW or HxWx3 (BGR), alpha dropped; whether that changed it."""
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise PrepareError(f'{path}: cannot be read as an image')
    if img.dtype != np.uint8:
        raise PrepareError(f'{path}: {img.dtype} image; 8-bit images only')
    if img.ndim == 3 and img.shape[2] == 4:
        return img[:, :, :3], False
    if img.ndim == 3 and img.shape[2] in (1, 2):  # grey (+ alpha)
        return img[:, :, 0], False
    return img, True


def mod_crop(img, mod):
    """Top-left part of ``img`` whose height and width are multiples of ``mod`` (MATLAB ``modcrop``)."""
    h, w = img.shape[:2]
    return img[:h - h % mod, :w - w % mod, ...]


def bicubic_downscale(hr, scale):
    """MATLAB ``imresize(modcrop(hr, scale), 1/scale, 'bicubic')`` of a uint8 image, rounded as MATLAB does."""
    hr = mod_crop(hr, scale)
    if hr.shape[0] < scale or hr.shape[1] < scale:
        raise PrepareError(f'image of {hr.shape[1]}x{hr.shape[0]} pixels is too small for x{scale}')
    # imresize is linear: feeding 0-255 instead of 0-1 gives the same result scaled, with less rounding error
    lr = imresize(hr.astype(np.float32), 1 / scale, antialiasing=True)
    expected = (hr.shape[0] // scale, hr.shape[1] // scale)
    if lr.shape[:2] != expected:  # ceil(h * (1/s)) can overshoot by one in floating point
        lr = lr[:expected[0], :expected[1], ...]
    # MATLAB's uint8 conversion rounds half away from zero and saturates
    return np.clip(np.floor(lr + 0.5), 0, 255).astype(np.uint8)


def _write(path, img):
    if not cv2.imwrite(path, img):
        raise PrepareError(f'cannot write {path}')


def prepare(input_folder, out_folder, scales=(2, 3, 4), mod=12, lr_from='hr', overwrite=False, log=print):
    """Write ``HR``, ``GTmod<mod>`` (mod > 0) and ``LRbicx<s>``; returns ``{subfolder: number of images}``.

    ``lr_from``: ``'hr'`` (LR from the HR cropped to a multiple of s, the standard files) or ``'gtmod'`` (LR from
    GTmod<mod>, BasicSR's MATLAB script).
    """
    if lr_from not in ('hr', 'gtmod'):
        raise PrepareError(f'lr_from must be "hr" or "gtmod", got {lr_from!r}')
    if lr_from == 'gtmod' and (not mod or any(mod % s for s in scales)):
        raise PrepareError(f'--lr-from gtmod needs --mod a multiple of every scale, got mod {mod}, scales {scales}')
    if not os.path.isdir(input_folder):
        raise PrepareError(f'input folder not found: {input_folder}')
    names = list_images(input_folder)
    if not names:
        raise PrepareError(f'no images in {input_folder}')
    stems = [os.path.splitext(n)[0] for n in names]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise PrepareError(f'several files per name in {input_folder}: {dup[:5]}')
    hr_out = os.path.join(out_folder, 'HR')
    same_hr = os.path.isdir(hr_out) and os.path.samefile(hr_out, input_folder)
    subfolders = ([] if same_hr else ['HR']) + ([f'GTmod{mod}'] if mod else []) + [f'LRbicx{s}' for s in scales]
    for sub in subfolders:
        path = os.path.join(out_folder, sub)
        if os.path.exists(path) and os.listdir(path):
            if not overwrite:
                raise PrepareError(f'{path} exists already: delete it or pass --overwrite')
            shutil.rmtree(path)
        os.makedirs(path, exist_ok=True)
    for name, stem in zip(names, stems):
        src = os.path.join(input_folder, name)
        hr, as_stored = read_hr(src)
        if not same_hr:
            if name.lower().endswith('.png') and as_stored:
                shutil.copyfile(src, os.path.join(hr_out, stem + '.png'))  # the original file, untouched
            else:
                _write(os.path.join(hr_out, stem + '.png'), hr)
        if mod:
            _write(os.path.join(out_folder, f'GTmod{mod}', stem + '.png'), mod_crop(hr, mod))
        source = mod_crop(hr, mod) if lr_from == 'gtmod' else hr
        for s in scales:
            _write(os.path.join(out_folder, f'LRbicx{s}', stem + '.png'), bicubic_downscale(source, s))
        log(f'{stem}: {hr.shape[1]}x{hr.shape[0]}')
    written = ['HR'] + [sub for sub in subfolders if sub != 'HR']
    counts = {sub: len(list_images(os.path.join(out_folder, sub))) for sub in written}
    log(f'{out_folder}: ' + ', '.join(f'{k} {v}' for k, v in counts.items()))
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('input', help='folder of HR images')
    parser.add_argument('output', help='set folder to write, e.g. datasets/Set5')
    parser.add_argument('--scales', type=int, nargs='+', default=[2, 3, 4])
    parser.add_argument('--mod', type=int, default=12, help='GTmod<mod> folder (0: none; default 12)')
    parser.add_argument('--lr-from', choices=('hr', 'gtmod'), default='hr',
                        help='LR from the HR cropped to a multiple of s (default; the standard benchmark files) or '
                             'from GTmod<mod> (BasicSR\'s MATLAB script)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing output folders')
    args = parser.parse_args(argv)
    try:
        prepare(args.input, args.output, tuple(args.scales), args.mod, args.lr_from, args.overwrite)
    except PrepareError as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
