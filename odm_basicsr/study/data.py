"""A folder of HR images made into the HR / LR pairs that BasicSR's ``PairedImageDataset`` trains on, and the
benchmark sets of the study scripts.

The study scripts' data root (``--data``) holds ``train/<set>/`` (HR images) and ``benchmark/<Set>/HR``,
``benchmark/<Set>/LRbicx<scale>`` (BasicSR's benchmark folders).
"""
import math
import os

from odm_basicsr.scoring import IMAGE_EXTS, image_files, load_benchmark

DEFAULT_DATA = os.path.join('..', 'shared', 'data')  # the shared data root, from the repository root
DEFAULT_TRAIN_SETS = ('T91', 'BSD200')
BENCHMARKS = ('Set5', 'Set14')


def hr_images(folder):
    """Paths of the images of ``folder`` (or of its ``HR`` subfolder); ValueError when there are none."""
    hr_dir = os.path.join(folder, 'HR') if os.path.isdir(os.path.join(folder, 'HR')) else folder
    files = image_files(hr_dir)
    if not files:
        raise ValueError(f'no images ({", ".join(IMAGE_EXTS)}) in {hr_dir}')
    return [os.path.join(hr_dir, f) for f in files]


def bicubic_lr(hr, scale):
    """The 8-bit LR image of an 8-bit HR image: BasicSR's MATLAB-compatible bicubic ``1 / scale``, rounded (as
    DIV2K's and the benchmarks' LR files are made)."""
    import numpy as np
    from basicsr.utils.matlab_functions import imresize

    lr = imresize(hr.astype(np.float32) / 255., 1. / scale)
    return np.clip(np.round(lr * 255.), 0, 255).astype(np.uint8)


def prepare_paired_data(hr_paths, out, scale, min_size, log=print, prog='odm-demo'):
    """Write ``HR/*.png`` (cropped to a multiple of ``scale``) and ``LR_bicubic/X<scale>/*.png`` under ``out``.

    LR = BasicSR's MATLAB-compatible bicubic downscale, rounded to 8 bit (as DIV2K's LR files are made). Existing
    files are kept. Images with a side under ``min_size`` are skipped. Returns ``(hr_dir, lr_dir, count)``.
    """
    import cv2
    import numpy as np

    hr_dir, lr_dir = os.path.join(out, 'HR'), os.path.join(out, 'LR_bicubic', f'X{scale}')
    os.makedirs(hr_dir, exist_ok=True)
    os.makedirs(lr_dir, exist_ok=True)
    count, skipped, made = 0, [], 0
    for path in hr_paths:
        name = os.path.splitext(os.path.basename(path))[0] + '.png'
        hr_out, lr_out = os.path.join(hr_dir, name), os.path.join(lr_dir, name)
        if os.path.isfile(hr_out) and os.path.isfile(lr_out):
            count += 1
            continue
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            skipped.append(f'{os.path.basename(path)} (unreadable)')
            continue
        h, w = img.shape[:2]
        h, w = h - h % scale, w - w % scale
        if min(h, w) < min_size:
            skipped.append(f'{os.path.basename(path)} ({img.shape[1]}x{img.shape[0]} < {min_size} px)')
            continue
        img = np.ascontiguousarray(img[:h, :w])
        cv2.imwrite(hr_out, img)
        cv2.imwrite(lr_out, bicubic_lr(img, scale))
        count += 1
        made += 1
    if skipped:
        log(f'--data: skipped {len(skipped)} image(s): {", ".join(skipped[:5])}{" ..." if len(skipped) > 5 else ""}')
    if count == 0:
        raise SystemExit(f'{prog}: error: --data: no usable image (each side must be >= {min_size} px)')
    if made:
        log(f'--data: made {made} LR image(s) (MATLAB bicubic x1/{scale}) in {lr_dir}')
    return hr_dir, lr_dir, count


def patch_options(scale, lr_patch, batch):
    """The training-set options every study shares: HR patch ``lr_patch * scale``, flips and rotations, no workers."""
    return {'gt_size': lr_patch * scale, 'use_hflip': True, 'use_rot': True, 'num_worker_per_gpu': 0,
            'batch_size_per_gpu': batch, 'prefetch_mode': None}


def paired_dataset_opt(paired, scale, lr_patch, batch):
    """``datasets.train`` of the pairs :func:`prepare_paired_data` made; enlarged to at least 100 batches an epoch."""
    hr_dir, lr_dir, count = paired
    return {'name': 'data_train', 'type': 'PairedImageDataset', 'dataroot_gt': os.path.abspath(hr_dir),
            'dataroot_lq': os.path.abspath(lr_dir), 'filename_tmpl': '{}', 'io_backend': {'type': 'disk'},
            'dataset_enlarge_ratio': max(1, math.ceil(100 * batch / count)), **patch_options(scale, lr_patch, batch)}


def benchmark_pairs(data, name, scale):
    """The scoring pairs ``(name, lq, gt)`` of ``<data>/benchmark/<name>``, loaded."""
    return load_benchmark(os.path.join(data, 'benchmark'), name, scale)
