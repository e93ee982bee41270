#!/usr/bin/env python
"""Cut DIV2K into BasicSR's sub-images (and optionally LMDB), as BasicSR's ``extract_subimages.py`` does.

Usage::

    python scripts/prepare_div2k.py --root datasets/DIV2K [--scales 2 3 4] [--lmdb] [--n-thread 8]

Input (the DIV2K download, images 0001-0800)::

    <root>/DIV2K_train_HR/0001.png ...
    <root>/DIV2K_train_LR_bicubic/X2/0001x2.png ...   (X3, X4 alike)

Output (what ``odm_basicsr/options/train/ODM/*.yml`` read)::

    <root>/DIV2K_train_HR_sub/0001_s001.png ...                  480 x 480 crops, step 240
    <root>/DIV2K_train_LR_bicubic/X{s}_sub/0001_s001.png ...     crop and step divided by s
    <root>/DIV2K_train_HR_sub.lmdb, <root>/DIV2K_train_LR_bicubic_X{s}_sub.lmdb     (with --lmdb)

Crop positions follow BasicSR exactly (``np.arange(0, h - crop + 1, step)`` plus a last crop flush with the
border when more than ``thresh_size`` pixels remain; PNG compression 3), so the sub-images are the ones BasicSR's
own script writes. Unlike that script, each HR image is processed with its LR images: a missing LR file, or an LR
image that is not exactly 1/s of its HR image, is an error naming the file instead of silently unpaired
sub-images. The LMDBs are written by BasicSR's ``make_lmdb_from_imgs`` (keys = file names without ``.png``,
``meta_info.txt`` inside), the format ``io_backend: {type: lmdb}`` reads.

Check the result with ``python scripts/check_dataset.py <root>``.
"""
# ruff: noqa: I001
import odm_basicsr.archs  # noqa: F401  (BasicSR fixes + registration first)

import argparse
import os
import shutil
import sys
from multiprocessing import Pool

import cv2
import numpy as np

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


class PrepareError(RuntimeError):
    """A problem with the input; the message names the file."""


def list_images(folder):
    """Sorted image file names (not paths) in ``folder`` (non-recursive)."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith('.'))


def crop_positions(length, crop_size, step, thresh_size=0):
    """Top/left crop coordinates along one axis, as BasicSR's ``extract_subimages.worker``."""
    if length < crop_size:
        raise PrepareError(f'size {length} is smaller than the crop size {crop_size}')
    space = np.arange(0, length - crop_size + 1, step)
    if length - (space[-1] + crop_size) > thresh_size:
        space = np.append(space, length - crop_size)
    return [int(p) for p in space]


def sub_images(img, crop_size, step, thresh_size=0):
    """``[(index, (top, left), crop)]`` with 1-based indices, row-major, as BasicSR."""
    h, w = img.shape[:2]
    out = []
    index = 0
    for x in crop_positions(h, crop_size, step, thresh_size):
        for y in crop_positions(w, crop_size, step, thresh_size):
            index += 1
            out.append((index, (x, y), np.ascontiguousarray(img[x:x + crop_size, y:y + crop_size, ...])))
    return out


def find_lr(lr_folder, stem, scale):
    """The LR file of HR image ``stem``: DIV2K names it ``<stem>x<s>.png``; ``<stem>.png`` is accepted too."""
    for name in (f'{stem}x{scale}', stem):
        for ext in IMG_EXTENSIONS:
            path = os.path.join(lr_folder, name + ext)
            if os.path.isfile(path):
                return path
    return None


def read_image(path):
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise PrepareError(f'{path}: cannot be read as an image')
    if img.dtype != np.uint8:
        raise PrepareError(f'{path}: {img.dtype} image; 8-bit images only')
    return img


def process_image(job):
    """Cut one HR image and its LR images; returns ``(name, number of sub-images)`` or raises PrepareError."""
    hr_path, hr_out, lr_specs, crop_size, step, thresh_size, compression = job
    stem = os.path.splitext(os.path.basename(hr_path))[0]
    hr = read_image(hr_path)
    hr_subs = sub_images(hr, crop_size, step, thresh_size)
    writes = [(hr_out, hr_subs)]
    for scale, lr_folder, lr_out in lr_specs:
        lr_path = find_lr(lr_folder, stem, scale)
        if lr_path is None:
            raise PrepareError(f'no LR image for {hr_path} in {lr_folder} (expected {stem}x{scale}.png)')
        lr = read_image(lr_path)
        if (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape[:2] or lr.shape[2:] != hr.shape[2:]:
            raise PrepareError(f'{lr_path} is {lr.shape[1]}x{lr.shape[0]}, not 1/{scale} of {hr_path} '
                               f'({hr.shape[1]}x{hr.shape[0]})')
        lr_subs = sub_images(lr, crop_size // scale, step // scale, thresh_size // scale)
        if [(i, (x * scale, y * scale)) for i, (x, y), _ in lr_subs] != [(i, p) for i, p, _ in hr_subs]:
            raise PrepareError(f'{lr_path}: its sub-images would not pair with those of {hr_path}')
        writes.append((lr_out, lr_subs))
    for out_folder, subs in writes:
        for index, _, crop in subs:
            path = os.path.join(out_folder, f'{stem}_s{index:03d}.png')
            if not cv2.imwrite(path, crop, [cv2.IMWRITE_PNG_COMPRESSION, compression]):
                raise PrepareError(f'cannot write {path}')
    return stem, len(hr_subs)


def _prepare_output(folder, overwrite):
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        if not overwrite:
            raise PrepareError(f'{folder} exists already: delete it or pass --overwrite')
        shutil.rmtree(folder) if os.path.isdir(folder) else os.remove(folder)
    os.makedirs(folder, exist_ok=True)


def make_lmdb(folder, lmdb_path, n_thread, overwrite):
    """LMDB of every PNG in ``folder`` with BasicSR's writer (keys = names without extension)."""
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs

    if os.path.exists(lmdb_path):
        if not overwrite:
            raise PrepareError(f'{lmdb_path} exists already: delete it or pass --overwrite')
        shutil.rmtree(lmdb_path)
    names = list_images(folder)
    keys = [os.path.splitext(n)[0] for n in names]
    bad = [k for k in keys if '.' in k]
    if bad:
        raise PrepareError(f'LMDB keys must not contain dots (BasicSR cuts them at the first "."): {bad[:5]}')
    make_lmdb_from_imgs(folder, lmdb_path, names, keys, n_thread=max(1, n_thread), multiprocessing_read=False)


def prepare(root, scales=(2, 3, 4), hr_folder=None, lr_root=None, crop_size=480, step=240, thresh_size=0,
            compression=3, n_thread=1, lmdb=False, overwrite=False, limit=None, log=print):
    """Write the sub-image folders (and LMDBs). Returns ``{folder: number of files}``."""
    hr_folder = hr_folder or os.path.join(root, 'DIV2K_train_HR')
    lr_root = lr_root or os.path.join(root, 'DIV2K_train_LR_bicubic')
    for s in scales:
        if crop_size % s or step % s or thresh_size % s:
            raise PrepareError(f'crop size {crop_size}, step {step} and thresh size {thresh_size} must be '
                               f'multiples of the scale {s}')
    if not os.path.isdir(hr_folder):
        raise PrepareError(f'HR folder not found: {hr_folder}')
    hr_names = list_images(hr_folder)
    if limit:
        hr_names = hr_names[:limit]
    if not hr_names:
        raise PrepareError(f'no images in {hr_folder}')
    hr_out = os.path.join(root, 'DIV2K_train_HR_sub')
    lr_specs = []
    for s in scales:
        lr_in = os.path.join(lr_root, f'X{s}')
        if not os.path.isdir(lr_in):
            raise PrepareError(f'LR folder not found: {lr_in}')
        lr_specs.append((s, lr_in, os.path.join(lr_root, f'X{s}_sub')))
    outputs = [(1, hr_out)] + [(s, out) for s, _, out in lr_specs]
    for _, out in outputs:
        _prepare_output(out, overwrite)
    jobs = [(os.path.join(hr_folder, n), hr_out, lr_specs, crop_size, step, thresh_size, compression)
            for n in hr_names]
    total = 0
    pool = Pool(n_thread) if n_thread > 1 else None
    try:
        results = pool.imap_unordered(process_image, jobs) if pool else map(process_image, jobs)
        for i, (_, n) in enumerate(results, 1):
            total += n
            if i % 50 == 0 or i == len(jobs):
                log(f'{i}/{len(jobs)} images, {total} sub-images in each folder')
    except PrepareError as e:
        raise PrepareError(f'{e} (the output folders are incomplete: fix this, then rerun with --overwrite)') from e
    finally:
        if pool:
            pool.terminate()
    counts = {out: len(list_images(out)) for _, out in outputs}
    for folder, n in counts.items():
        log(f'{folder}: {n} sub-images')
    if lmdb:
        for s, out in outputs:
            name = 'DIV2K_train_HR_sub.lmdb' if s == 1 else f'DIV2K_train_LR_bicubic_X{s}_sub.lmdb'
            lmdb_path = os.path.join(root, name)
            make_lmdb(out, lmdb_path, n_thread, overwrite)
            counts[lmdb_path] = counts[out]
            log(f'{lmdb_path}: {counts[out]} images')
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--root', required=True, help='DIV2K folder (holds DIV2K_train_HR, DIV2K_train_LR_bicubic)')
    parser.add_argument('--hr', default=None, help='HR folder (default <root>/DIV2K_train_HR)')
    parser.add_argument('--lr', default=None, help='folder of X2/X3/X4 (default <root>/DIV2K_train_LR_bicubic)')
    parser.add_argument('--scales', type=int, nargs='+', default=[2, 3, 4])
    parser.add_argument('--crop-size', type=int, default=480, help='HR crop size (default 480)')
    parser.add_argument('--step', type=int, default=240, help='HR step (default 240)')
    parser.add_argument('--thresh-size', type=int, default=0, help='HR threshold size (default 0)')
    parser.add_argument('--compression-level', type=int, default=3, help='PNG compression 0-9 (default 3)')
    parser.add_argument('--n-thread', type=int, default=os.cpu_count() or 1, help='worker processes')
    parser.add_argument('--lmdb', action='store_true', help='also write LMDBs with BasicSR\'s make_lmdb_from_imgs')
    parser.add_argument('--overwrite', action='store_true', help='replace existing output folders')
    parser.add_argument('--limit', type=int, default=None, help='first N HR images only (for a quick try)')
    args = parser.parse_args(argv)
    try:
        prepare(args.root, tuple(args.scales), args.hr, args.lr, args.crop_size, args.step, args.thresh_size,
                args.compression_level, args.n_thread, args.lmdb, args.overwrite, args.limit)
    except PrepareError as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
