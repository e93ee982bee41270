"""``scripts/prepare_div2k.py``, ``scripts/prepare_benchmark.py`` and ``scripts/check_dataset.py``.

On small generated images in temporary folders, and on ``../shared/data/benchmark/Set5`` (skipped where absent):
regenerating Set5's LRbicx4 from its HR images must match the shipped LR images to within one grey level for at
least 99 % of the pixels.
"""
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils.matlab_functions import imresize
from odm_helpers import load_script

REPO = Path(__file__).resolve().parents[1]
SET5 = REPO.parent / 'shared' / 'data' / 'benchmark' / 'Set5'


pytestmark = pytest.mark.usefixtures('one_thread')
div2k = load_script('prepare_div2k')
bench = load_script('prepare_benchmark')
check = load_script('check_dataset')


def _quiet(*args, **kwargs):
    pass


def _image(h, w, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1) + ((channels,) if channels > 1 else ()))
    img = cv2.resize(base.astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)  # smooth-ish content
    return img if channels > 1 or img.ndim == 2 else img[:, :, 0]


def _run_check(*args):
    lines = []
    code = check.main([str(a) for a in args], out=lines.append)
    return code, '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------- DIV2K


def _basicsr_positions(length, crop_size, step, thresh_size=0):
    """BasicSR's extract_subimages.worker, verbatim in substance."""
    space = np.arange(0, length - crop_size + 1, step)
    if length - (space[-1] + crop_size) > thresh_size:
        space = np.append(space, length - crop_size)
    return list(space)


def _fake_div2k(root, sizes=((108, 132), (96, 84)), scales=(2, 3, 4)):
    hr_dir = root / 'DIV2K_train_HR'
    hr_dir.mkdir(parents=True)
    for i, (h, w) in enumerate(sizes, 1):
        hr = _image(h, w, seed=i)
        cv2.imwrite(str(hr_dir / f'{i:04d}.png'), hr)
        for s in scales:
            lr_dir = root / 'DIV2K_train_LR_bicubic' / f'X{s}'
            lr_dir.mkdir(parents=True, exist_ok=True)
            lr = bench.bicubic_downscale(hr, s)
            cv2.imwrite(str(lr_dir / f'{i:04d}x{s}.png'), lr)
    return root


@pytest.mark.parametrize('n_thread', [1, 2])
def test_prepare_div2k_cuts_basicsr_sub_images(tmp_path, n_thread, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / 'scripts'))  # for worker processes that import instead of fork
    root = _fake_div2k(tmp_path / 'DIV2K')
    counts = div2k.prepare(str(root), crop_size=48, step=24, n_thread=n_thread, lmdb=n_thread == 1, log=_quiet)
    hr_sub = root / 'DIV2K_train_HR_sub'
    expected = 0
    for i, (h, w) in enumerate(((108, 132), (96, 84)), 1):
        hr = cv2.imread(str(root / 'DIV2K_train_HR' / f'{i:04d}.png'), cv2.IMREAD_UNCHANGED)
        index = 0
        for x in _basicsr_positions(h, 48, 24):
            for y in _basicsr_positions(w, 48, 24):
                index += 1
                sub = cv2.imread(str(hr_sub / f'{i:04d}_s{index:03d}.png'), cv2.IMREAD_UNCHANGED)
                assert np.array_equal(sub, hr[x:x + 48, y:y + 48])
                for s in (2, 3, 4):
                    lr = cv2.imread(str(root / 'DIV2K_train_LR_bicubic' / f'X{s}' / f'{i:04d}x{s}.png'),
                                    cv2.IMREAD_UNCHANGED)
                    lr_sub_path = root / 'DIV2K_train_LR_bicubic' / f'X{s}_sub' / f'{i:04d}_s{index:03d}.png'
                    lr_sub = cv2.imread(str(lr_sub_path), cv2.IMREAD_UNCHANGED)
                    c, xs, ys = 48 // s, x // s, y // s
                    assert np.array_equal(lr_sub, lr[xs:xs + c, ys:ys + c])
        expected += index
    assert counts[str(hr_sub)] == expected == 4 * 5 + 3 * 3  # rows x columns per image
    assert all(n == expected for n in counts.values())

    code, text = _run_check(root)
    assert code == 0, text
    assert text.count('OK ') == 3 + (3 if n_thread == 1 else 0) and f'{expected} pairs' in text

    if n_thread == 1:  # LMDBs in BasicSR's format, read by PairedImageDataset
        meta = (root / 'DIV2K_train_HR_sub.lmdb' / 'meta_info.txt').read_text().split('\n')
        assert meta[0] == '0001_s001.png (48,48,3) 1'
        dataset = PairedImageDataset({
            'dataroot_gt': str(root / 'DIV2K_train_HR_sub.lmdb'),
            'dataroot_lq': str(root / 'DIV2K_train_LR_bicubic_X4_sub.lmdb'),
            'io_backend': {'type': 'lmdb'}, 'phase': 'train', 'scale': 4, 'gt_size': 32, 'use_hflip': True,
            'use_rot': True, 'filename_tmpl': '{}'})
        assert len(dataset) == expected
        item = dataset[0]
        assert tuple(item['gt'].shape) == (3, 32, 32) and tuple(item['lq'].shape) == (3, 8, 8)


def test_div2k_sub_images_work_with_paired_image_dataset(tmp_path):
    root = _fake_div2k(tmp_path / 'DIV2K', sizes=((96, 96),), scales=(4,))
    div2k.prepare(str(root), scales=(4,), crop_size=48, step=24, log=_quiet)
    dataset = PairedImageDataset({
        'dataroot_gt': str(root / 'DIV2K_train_HR_sub'), 'dataroot_lq': str(root / 'DIV2K_train_LR_bicubic/X4_sub'),
        'io_backend': {'type': 'disk'}, 'phase': 'train', 'scale': 4, 'gt_size': 48, 'use_hflip': True,
        'use_rot': True, 'filename_tmpl': '{}'})
    assert len(dataset) == 9
    assert tuple(dataset[3]['lq'].shape) == (3, 12, 12)


def test_prepare_div2k_errors(tmp_path):
    root = _fake_div2k(tmp_path / 'DIV2K', sizes=((96, 96),), scales=(2, 4))
    with pytest.raises(div2k.PrepareError, match='LR folder not found: .*X3'):
        div2k.prepare(str(root), scales=(2, 3), crop_size=48, step=24, log=_quiet)
    with pytest.raises(div2k.PrepareError, match='multiples of the scale 3'):
        div2k.prepare(str(root), scales=(3,), crop_size=40, step=20, log=_quiet)
    with pytest.raises(div2k.PrepareError, match='smaller than the crop size 480'):
        div2k.prepare(str(root), scales=(2,), log=_quiet)
    div2k.prepare(str(root), scales=(2,), crop_size=48, step=24, log=_quiet)
    with pytest.raises(div2k.PrepareError, match='exists already: delete it or pass --overwrite'):
        div2k.prepare(str(root), scales=(2,), crop_size=48, step=24, log=_quiet)
    os.remove(root / 'DIV2K_train_LR_bicubic' / 'X4' / '0001x4.png')
    with pytest.raises(div2k.PrepareError, match=r'no LR image for .*0001\.png .*expected 0001x4\.png'):
        div2k.prepare(str(root), scales=(4,), crop_size=48, step=24, overwrite=True, log=_quiet)
    cv2.imwrite(str(root / 'DIV2K_train_LR_bicubic' / 'X4' / '0001x4.png'), _image(23, 24))
    with pytest.raises(div2k.PrepareError, match=r'0001x4\.png is 24x23, not 1/4 of .*0001\.png \(96x96\)'):
        div2k.prepare(str(root), scales=(4,), crop_size=48, step=24, overwrite=True, log=_quiet)
    assert div2k.main(['--root', str(tmp_path / 'nowhere')]) == 1


def test_check_dataset_finds_problems(tmp_path):
    root = _fake_div2k(tmp_path / 'DIV2K', sizes=((96, 96),), scales=(2,))
    div2k.prepare(str(root), scales=(2,), crop_size=48, step=24, log=_quiet)
    lr_sub = root / 'DIV2K_train_LR_bicubic' / 'X2_sub'
    os.remove(lr_sub / '0001_s002.png')
    code, text = _run_check(root)
    assert code == 1 and '9 GT files but 8 LQ files' in text and 'GT images without LQ image: 0001_s002.png' in text
    cv2.imwrite(str(lr_sub / '0001_s002.png'), _image(20, 24))
    (lr_sub / 'notes.txt').write_text('stray')
    code, text = _run_check(root)
    assert code == 1 and 'files that are not images: notes.txt' in text
    assert 'sizes do not pair: 0001_s002.png: GT 48x48, LQ 24x20 (needs LQ x scale == GT)' in text
    code, text = _run_check(root, '--scales', '2', '3')
    assert 'folder not found' in text and 'X3_sub' in text
    code, text = _run_check(tmp_path / 'nowhere')
    assert code == 1 and 'folder not found' in text
    code, text = _run_check(tmp_path)
    assert code == 1 and 'neither DIV2K sub-images' in text
    with pytest.raises(SystemExit):
        check.main(['--gt', str(root)])  # --gt needs --lq and --scale


# ---------------------------------------------------------------------------------------------------- benchmark


def test_prepare_benchmark_layout_and_bicubic(tmp_path):
    src = tmp_path / 'originals'
    src.mkdir()
    rgb, grey = _image(50, 37, seed=1), _image(30, 41, channels=1, seed=2)
    rgba = np.dstack([_image(26, 26, seed=3), np.full((26, 26), 255, np.uint8)])
    cv2.imwrite(str(src / 'rgb.png'), rgb)
    cv2.imwrite(str(src / 'grey.png'), grey)
    cv2.imwrite(str(src / 'rgba.png'), rgba)
    cv2.imwrite(str(src / 'photo.bmp'), rgb[:24, :36])
    out = tmp_path / 'MySet'
    counts = bench.prepare(str(src), str(out), log=_quiet)
    assert counts == {'HR': 4, 'GTmod12': 4, 'LRbicx2': 4, 'LRbicx3': 4, 'LRbicx4': 4}

    assert (out / 'HR' / 'rgb.png').read_bytes() == (src / 'rgb.png').read_bytes()  # the original, untouched
    assert np.array_equal(cv2.imread(str(out / 'HR' / 'photo.png'), cv2.IMREAD_UNCHANGED), rgb[:24, :36])
    assert cv2.imread(str(out / 'HR' / 'rgba.png'), cv2.IMREAD_UNCHANGED).shape == (26, 26, 3)  # alpha dropped
    assert cv2.imread(str(out / 'GTmod12' / 'rgb.png'), cv2.IMREAD_UNCHANGED).shape == (48, 36, 3)
    assert cv2.imread(str(out / 'GTmod12' / 'grey.png'), cv2.IMREAD_UNCHANGED).shape == (24, 36)
    for s in (2, 3, 4):
        lr = cv2.imread(str(out / f'LRbicx{s}' / 'rgb.png'), cv2.IMREAD_UNCHANGED)
        assert lr.shape == (50 // s, 37 // s, 3)
        crop = rgb[:50 - 50 % s, :37 - 37 % s].astype(np.float64) / 255
        expected = np.clip(np.floor(imresize(crop, 1 / s) * 255 + 0.5), 0, 255)
        assert np.abs(lr.astype(np.float64) - expected).max() <= 1  # float32 rounding at .5 only
        assert cv2.imread(str(out / f'LRbicx{s}' / 'grey.png'), cv2.IMREAD_UNCHANGED).shape == (30 // s, 41 // s)

    code, text = _run_check(out)  # LR pairs with HR; GTmod12 (not made from it) is only a warning
    assert code == 0, text
    assert text.count('OK ') == 3 and 'WARNING' in text and 'use dataroot_gt' in text

    with pytest.raises(bench.PrepareError, match='exists already'):
        bench.prepare(str(src), str(out), log=_quiet)
    bench.prepare(str(out / 'HR'), str(out), scales=(4,), overwrite=True, log=_quiet)  # HR folder as input
    assert (out / 'HR' / 'rgb.png').read_bytes() == (src / 'rgb.png').read_bytes()


def test_prepare_benchmark_lr_from_gtmod_pairs_with_gtmod12(tmp_path):
    src = tmp_path / 'originals'
    src.mkdir()
    cv2.imwrite(str(src / 'a.png'), _image(50, 37, seed=4))
    out = tmp_path / 'Set'
    bench.prepare(str(src), str(out), scales=(2, 4), lr_from='gtmod', log=_quiet)
    assert cv2.imread(str(out / 'LRbicx4' / 'a.png')).shape == (12, 9, 3)  # from the 48 x 36 GTmod12
    code, text = _run_check(out)
    assert code == 0 and 'WARNING' not in text and text.count('OK ') == 4, text
    with pytest.raises(bench.PrepareError, match='multiple of every scale'):
        bench.prepare(str(src), str(tmp_path / 'x'), scales=(5,), lr_from='gtmod', log=_quiet)


def test_check_dataset_on_benchmark_problems(tmp_path):
    src = tmp_path / 'originals'
    src.mkdir()
    for i in range(2):
        cv2.imwrite(str(src / f'im{i}.png'), _image(40, 44, seed=i))
    out = tmp_path / 'Set'
    bench.prepare(str(src), str(out), scales=(2,), mod=0, log=_quiet)
    cv2.imwrite(str(out / 'LRbicx2' / 'im1.png'), _image(21, 22))
    os.rename(out / 'LRbicx2' / 'im0.png', out / 'LRbicx2' / 'other.png')
    code, text = _run_check(tmp_path)  # a folder of sets
    assert code == 1
    assert 'GT images without LQ image: im0.png -> im0.png' in text and 'LQ images without GT image: other.png' in text
    assert 'GT 44x40, LQ 22x21 (needs GT // scale == LQ)' in text


# ---------------------------------------------------------------------------------------------------- Set5


def test_set5_lrbicx4_matches_the_shipped_files(tmp_path, capsys):
    if not (SET5 / 'HR').is_dir() or not (SET5 / 'LRbicx4').is_dir():
        pytest.skip(f'{SET5} is absent (the shared benchmark data sit beside the project on team machines)')
    bench.prepare(str(SET5 / 'HR'), str(tmp_path / 'Set5'), scales=(4,), mod=0, log=_quiet)
    within1 = exact = total = inner_within1 = inner_total = 0
    for name in sorted(os.listdir(SET5 / 'LRbicx4')):
        ours = cv2.imread(str(tmp_path / 'Set5' / 'LRbicx4' / name), cv2.IMREAD_UNCHANGED).astype(int)
        shipped = cv2.imread(str(SET5 / 'LRbicx4' / name), cv2.IMREAD_UNCHANGED).astype(int)
        assert ours.shape == shipped.shape, name
        diff = np.abs(ours - shipped)
        within1 += int((diff <= 1).sum())
        exact += int((diff == 0).sum())
        total += diff.size
        inner = diff[2:-2, 2:-2]
        inner_within1 += int((inner <= 1).sum())
        inner_total += inner.size
    with capsys.disabled():
        print(f'\nSet5 LRbicx4 regenerated vs shipped: {within1 / total:.3%} of pixels within 1 grey level '
              f'({inner_within1 / inner_total:.3%} at 2+ px from the border), {exact / total:.2%} identical')
    assert within1 / total >= 0.99
    assert inner_within1 / inner_total >= 0.999  # the larger differences sit at the image borders
