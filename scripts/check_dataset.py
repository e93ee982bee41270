#!/usr/bin/env python
"""Check a prepared SR dataset before training on it: counts, HR/LR pairing, LR size = HR size / scale.

Usage::

    python scripts/check_dataset.py datasets/DIV2K                  # sub-images (and LMDBs) of prepare_div2k.py
    python scripts/check_dataset.py datasets/Set5 datasets/Set14     # benchmark sets (HR, GTmod12, LRbicx{s})
    python scripts/check_dataset.py datasets/benchmark               # a folder of benchmark sets
    python scripts/check_dataset.py --gt DIR --lq DIR --scale 4 [--filename-tmpl '{}x4']   # any folder pair

What is checked, per GT/LQ folder pair, with the rules of BasicSR's ``PairedImageDataset`` (folder mode):

* both folders exist and hold the same number of files (stray files count: BasicSR counts them too);
* every GT image has its LQ image (``filename_tmpl.format(name) + ext``, same extension) and vice versa;
* sizes: ``LQ * scale == GT`` exactly for sub-images, GTmod12 and DIV2K; ``GT // scale == LQ`` for the original
  HR of a benchmark set (BasicSR crops the GT to ``LQ * scale``); the same number of channels (a warning);
* benchmark sets: LRbicx{s} made from HR cropped to a multiple of s (the standard files) must pair with HR, and
  GTmod12 not pairing with them is a warning; LRbicx{s} made from GTmod12 (BasicSR's MATLAB script) must pair
  with GTmod12 exactly and with HR after BasicSR's crop;
* with ``--decode``, every image decodes (otherwise only the headers are read, which is fast);
* LMDBs (``*.lmdb`` beside the DIV2K folders): ``meta_info.txt`` keys of GT and LQ agree and match the folder.

Prints one line per check and a summary; exit status 0 when everything is right, 1 otherwise.
"""
import argparse
import os
import re
import sys

from PIL import Image

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
_CHANNELS = {'1': 1, 'L': 1, 'P': 3, 'RGB': 3, 'RGBA': 4, 'LA': 2, 'I;16': 1, 'I': 1, 'F': 1, 'CMYK': 4}


class Report:
    """Collects OK lines, warnings and problems."""

    def __init__(self, out=print):
        self.out = out
        self.problems = []
        self.warnings = []

    def ok(self, msg):
        self.out(f'OK       {msg}')

    def warn(self, msg):
        self.warnings.append(msg)
        self.out(f'WARNING  {msg}')

    def problem(self, msg):
        self.problems.append(msg)
        self.out(f'PROBLEM  {msg}')


def _shown(items, n=5):
    items = list(items)
    return ', '.join(map(str, items[:n])) + (f', ... ({len(items)} in all)' if len(items) > n else '')


def image_info(path, decode=False):
    """``(width, height, channels)`` from the header (or the decoded image); raises OSError if unreadable."""
    with Image.open(path) as img:
        if decode:
            img.load()
        return img.size[0], img.size[1], _CHANNELS.get(img.mode, len(img.getbands()))


def _fits(gt, lq, scale, rule):
    """``rule``: 'exact' (LQ * s == GT), 'floor' (GT // s == LQ) or an int m (LQ * s <= GT < LQ * s + m)."""
    if rule == 'exact':
        return all(q * scale == g for g, q in zip(gt, lq))
    if rule == 'floor':
        return all(g // scale == q for g, q in zip(gt, lq))
    return all(q * scale <= g < q * scale + rule for g, q in zip(gt, lq))


_RULES = {'exact': 'LQ x scale == GT', 'floor': 'GT // scale == LQ'}


def check_pair(gt_dir, lq_dir, scale, report, rule='exact', filename_tmpl='{}', decode=False):
    """Check one GT/LQ folder pair (size ``rule``: see :func:`_fits`); returns the number of good pairs."""
    label = f'{gt_dir} <-> {lq_dir} (x{scale})'
    for d in (gt_dir, lq_dir):
        if not os.path.isdir(d):
            report.problem(f'{label}: folder not found: {d}')
            return 0
    gt_files = sorted(f for f in os.listdir(gt_dir) if not f.startswith('.'))
    lq_files = sorted(f for f in os.listdir(lq_dir) if not f.startswith('.'))
    n_before = len(report.problems)
    if len(gt_files) != len(lq_files):
        report.problem(f'{label}: {len(gt_files)} GT files but {len(lq_files)} LQ files (BasicSR needs equal '
                       'counts)')
    stray = [f for f in gt_files + lq_files if not f.lower().endswith(IMG_EXTENSIONS)]
    if stray:
        report.problem(f'{label}: files that are not images: {_shown(stray)}')
    gt_imgs = [f for f in gt_files if f.lower().endswith(IMG_EXTENSIONS)]
    lq_set = set(lq_files)
    expected_lq = {}
    for f in gt_imgs:
        stem, ext = os.path.splitext(f)
        expected_lq[f] = filename_tmpl.format(stem) + ext
    missing = [f'{f} -> {q}' for f, q in expected_lq.items() if q not in lq_set]
    if missing:
        report.problem(f'{label}: GT images without LQ image: {_shown(missing)}')
    orphans = sorted(set(f for f in lq_files if f.lower().endswith(IMG_EXTENSIONS)) - set(expected_lq.values()))
    if orphans:
        report.problem(f'{label}: LQ images without GT image: {_shown(orphans)}')
    bad_size, unreadable, channels, good = [], [], [], 0
    for f, q in expected_lq.items():
        if q not in lq_set:
            continue
        try:
            gw, gh, gc = image_info(os.path.join(gt_dir, f), decode)
            lw, lh, lc = image_info(os.path.join(lq_dir, q), decode)
        except OSError as e:
            unreadable.append(f'{f} ({e})')
            continue
        if not _fits((gw, gh), (lw, lh), scale, rule):
            needs = _RULES.get(rule, f'LQ x scale <= GT < LQ x scale + {rule}')
            bad_size.append(f'{f}: GT {gw}x{gh}, LQ {lw}x{lh} (needs {needs})')
            continue
        if gc != lc:
            channels.append(f'{f}: GT {gc}, LQ {lc}')
        good += 1
    if unreadable:
        report.problem(f'{label}: unreadable images: {_shown(unreadable, 3)}')
    if bad_size:
        report.problem(f'{label}: sizes do not pair: {_shown(bad_size, 3)}')
    if channels:
        report.warn(f'{label}: channel counts differ (BasicSR reads both as colour): {_shown(channels, 3)}')
    if len(report.problems) == n_before:
        report.ok(f'{label}: {good} pairs')
    return good


def _lmdb_keys(path, report):
    meta = os.path.join(path, 'meta_info.txt')
    if not os.path.isfile(meta) or not os.path.isfile(os.path.join(path, 'data.mdb')):
        report.problem(f'{path}: not a BasicSR LMDB (needs data.mdb and meta_info.txt)')
        return None
    with open(meta) as f:
        return [line.split(' ')[0].split('.')[0] for line in f if line.strip()]


def check_div2k(root, scales, report, decode=False):
    hr = os.path.join(root, 'DIV2K_train_HR_sub')
    lr_root = os.path.join(root, 'DIV2K_train_LR_bicubic')
    found = [int(m.group(1)) for d in sorted(os.listdir(lr_root)) if (m := re.fullmatch(r'X(\d+)_sub', d))] \
        if os.path.isdir(lr_root) else []
    use = scales or found
    if not use:
        report.problem(f'{root}: no DIV2K_train_LR_bicubic/X<s>_sub folder')
    for s in use:
        check_pair(hr, os.path.join(lr_root, f'X{s}_sub'), s, report, rule='exact', decode=decode)
    hr_lmdb = os.path.join(root, 'DIV2K_train_HR_sub.lmdb')
    if os.path.isdir(hr_lmdb):
        hr_keys = _lmdb_keys(hr_lmdb, report)
        folder_keys = sorted(os.path.splitext(f)[0] for f in os.listdir(hr) if f.lower().endswith(IMG_EXTENSIONS))
        if hr_keys is not None and sorted(hr_keys) != folder_keys:
            report.problem(f'{hr_lmdb}: its {len(hr_keys)} keys differ from the {len(folder_keys)} images of {hr}')
        for s in use:
            lr_lmdb = os.path.join(root, f'DIV2K_train_LR_bicubic_X{s}_sub.lmdb')
            if not os.path.isdir(lr_lmdb):
                report.problem(f'{lr_lmdb}: missing (the HR LMDB exists)')
                continue
            lr_keys = _lmdb_keys(lr_lmdb, report)
            if hr_keys is not None and lr_keys is not None:
                if sorted(lr_keys) != sorted(hr_keys):
                    report.problem(f'{hr_lmdb} <-> {lr_lmdb}: keys differ '
                                   f'({_shown(sorted(set(hr_keys) ^ set(lr_keys)))})')
                else:
                    report.ok(f'{hr_lmdb} <-> {lr_lmdb}: {len(hr_keys)} keys')


def is_benchmark_set(path):
    subs = set(os.listdir(path)) if os.path.isdir(path) else set()
    return bool(subs & {'HR', 'GTmod12'}) and any(re.fullmatch(r'LRbicx\d+', s) for s in subs)


def _quiet_pair(gt, lq, scale, rule, decode):
    sub = Report(out=lambda _msg: None)
    check_pair(gt, lq, scale, sub, rule=rule, decode=decode)
    return sub


def _relay(sub, report):
    for msg in sub.problems:
        report.problem(msg)
    for msg in sub.warnings:
        report.warn(msg)


def check_benchmark_set(path, scales, report, decode=False):
    """Each LRbicx{s} against HR and GTmod<m>, in either convention of making the LR images.

    Standard files (SelfExSR; ``prepare_benchmark.py`` default): LR from HR cropped to a multiple of s, so
    ``HR // s == LR``; GTmod<m> not pairing is a warning. BasicSR's MATLAB script (``--lr-from gtmod``): LR from
    GTmod<m>, so ``LR * s == GTmod`` and HR pairs after BasicSR's crop (``LR * s <= HR < LR * s + m``).
    """
    subs = sorted(os.listdir(path))
    found = sorted(int(m.group(1)) for s in subs if (m := re.fullmatch(r'LRbicx(\d+)', s)))
    gtmods = [d for d in subs if re.fullmatch(r'GTmod\d+', d)]
    for s in scales or found:
        lq = os.path.join(path, f'LRbicx{s}')
        hr = os.path.join(path, 'HR') if 'HR' in subs else None
        pairs = {d: _quiet_pair(os.path.join(path, d), lq, s, 'exact', decode) for d in gtmods if int(d[5:]) % s == 0}
        if hr is None:
            for d, sub in pairs.items():
                if sub.problems:
                    _relay(sub, report)
                else:
                    report.ok(f'{os.path.join(path, d)} <-> {lq} (x{s}): pairs')
            if not pairs:
                report.problem(f'{path}: no HR or GTmod<m> folder for {lq}')
            continue
        standard = _quiet_pair(hr, lq, s, 'floor', decode)
        from_gtmod = [d for d, sub in pairs.items() if not sub.problems]
        if not standard.problems:
            report.ok(f'{hr} <-> {lq} (x{s}): pairs (LR from HR cropped to a multiple of {s})')
            for d in pairs:
                if d in from_gtmod:
                    report.ok(f'{os.path.join(path, d)} <-> {lq} (x{s}): pairs too')
                else:
                    report.warn(f'{os.path.join(path, d)} does not pair with {lq} (LR made from HR cropped to a '
                                f'multiple of {s}, the standard files): use dataroot_gt {hr}')
        elif from_gtmod:
            d = from_gtmod[0]
            report.ok(f'{os.path.join(path, d)} <-> {lq} (x{s}): pairs (LR made from {d}, BasicSR\'s MATLAB script)')
            cropped = _quiet_pair(hr, lq, s, int(d[5:]), decode)
            if cropped.problems:
                _relay(cropped, report)
            else:
                report.ok(f'{hr} <-> {lq} (x{s}): pairs after BasicSR\'s crop of the GT')
        else:
            _relay(standard, report)
            for sub in pairs.values():
                _relay(sub, report)
    for gtmod in gtmods:
        mod = int(gtmod[5:])
        folder = os.path.join(path, gtmod)
        off = []
        for f in sorted(os.listdir(folder)):
            if f.lower().endswith(IMG_EXTENSIONS):
                try:
                    w, h, _ = image_info(os.path.join(folder, f))
                except OSError:
                    continue  # reported by check_pair
                if w % mod or h % mod:
                    off.append(f'{f} ({w}x{h})')
        if off:
            report.problem(f'{folder}: sizes not multiples of {mod}: {_shown(off, 3)}')


def check_path(path, scales, report, decode=False):
    """Recognise the layout of ``path`` and check it."""
    if not os.path.isdir(path):
        report.problem(f'{path}: folder not found')
    elif os.path.isdir(os.path.join(path, 'DIV2K_train_HR_sub')):
        check_div2k(path, scales, report, decode)
    elif is_benchmark_set(path):
        check_benchmark_set(path, scales, report, decode)
    else:
        sets = [os.path.join(path, d) for d in sorted(os.listdir(path)) if is_benchmark_set(os.path.join(path, d))]
        if not sets:
            report.problem(f'{path}: neither DIV2K sub-images (DIV2K_train_HR_sub), a benchmark set (HR or GTmod12 '
                           'with LRbicx<s>) nor a folder of benchmark sets')
        for s in sets:
            check_benchmark_set(s, scales, report, decode)


def main(argv=None, out=print):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('paths', nargs='*', help='DIV2K root, benchmark set(s) or a folder of sets')
    parser.add_argument('--scales', type=int, nargs='+', default=None,
                        help='scales that must be there (default: those found)')
    parser.add_argument('--gt', help='GT folder (with --lq and --scale: check one folder pair)')
    parser.add_argument('--lq', help='LQ folder')
    parser.add_argument('--scale', type=int, help='scale of --gt/--lq')
    parser.add_argument('--filename-tmpl', default='{}', help='LQ name template of --gt/--lq (BasicSR option)')
    parser.add_argument('--floor', action='store_true',
                        help='--gt/--lq: GT may be larger than LQ * scale (original HR of a benchmark set)')
    parser.add_argument('--decode', action='store_true', help='decode every image (slow), not only the headers')
    args = parser.parse_args(argv)
    pair_mode = any(v is not None for v in (args.gt, args.lq, args.scale))
    if pair_mode and not (args.gt and args.lq and args.scale):
        parser.error('--gt, --lq and --scale go together')
    if not pair_mode and not args.paths:
        parser.error('give a dataset folder, or --gt, --lq and --scale')
    report = Report(out)
    if pair_mode:
        check_pair(args.gt, args.lq, args.scale, report, rule='floor' if args.floor else 'exact',
                   filename_tmpl=args.filename_tmpl, decode=args.decode)
    for path in args.paths:
        check_path(path, args.scales, report, args.decode)
    if report.problems:
        out(f'{len(report.problems)} problem(s), {len(report.warnings)} warning(s).')
        return 1
    out(f'All checks passed ({len(report.warnings)} warning(s)).')
    return 0


if __name__ == '__main__':
    sys.exit(main())
