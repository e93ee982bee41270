"""Packaging (issue 10, item 5): the option files are package data, found by name, and ship in the wheel.

The full check (the wheel installed without -e into a fresh environment, ``odm-train`` running a packaged file
from a folder outside the clone) is the second half of ``.ci/run``; here: the name lookup, the ``-opt`` and
``--list-options`` handling of the entry points, setup.py's globs, and a wheel built from the repository files
and unpacked (``pip install --target``) into a folder that odm-train's listing and lookup then use.
"""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from unittest import mock

import pytest

from odm_basicsr import option_files

REPO = Path(__file__).resolve().parents[1]
OPTIONS = REPO / 'odm_basicsr' / 'options'
ON_DISK = sorted(p.relative_to(OPTIONS).as_posix() for p in OPTIONS.rglob('*.yml'))
DEMO = 'train/demo/train_EDSR_W4A4_x2_embedded.yml'


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------ the name lookup
def test_the_option_files_live_in_the_package():
    assert not (REPO / 'options').exists(), 'the option files moved to odm_basicsr/options (package data)'
    assert Path(option_files.root()) == OPTIONS
    assert option_files.names() == ON_DISK and len(ON_DISK) == 74
    assert option_files.names('train') == [n for n in ON_DISK if n.startswith('train/')]
    assert option_files.names('test') == [n for n in ON_DISK if n.startswith('test/')]
    assert {'train/ODM/train_ODM_EDSR_W4A4_x4.yml', 'test/RLFN/test_RLFN_x4.yml', DEMO} <= set(ON_DISK)
    with pytest.raises(ValueError, match='kind must be one of'):
        option_files.names('val')


@pytest.mark.parametrize('name', [DEMO, f'options/{DEMO}', f'./options/{DEMO}', 'train_EDSR_W4A4_x2_embedded.yml',
                                  DEMO.replace('/', os.sep)])
def test_path_accepts_a_name_the_old_options_prefix_and_a_unique_file_name(name):
    assert option_files.path(name) == str(OPTIONS / 'train' / 'demo' / 'train_EDSR_W4A4_x2_embedded.yml')


def test_path_of_an_unknown_name_says_where_to_look_and_what_is_close():
    with pytest.raises(FileNotFoundError, match=r"no packaged option file 'train/ODM/train_ODM_EDSR_W4A4_x5\.yml' "
                       r'\(74 in .*odm-train --list-options\); did you mean train/ODM/train_ODM_EDSR_W4A4_x4\.yml'):
        option_files.path('train/ODM/train_ODM_EDSR_W4A4_x5.yml')
    with pytest.raises(FileNotFoundError, match='did you mean test/RLFN/test_RLFN_x4.yml'):
        option_files.path('test_RLFN_x2.yml')
    with pytest.raises(FileNotFoundError):
        option_files.path('ODM')  # a folder is not a file


def test_resolve_prefers_a_file_on_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert option_files.resolve(DEMO) == option_files.path(DEMO)
    assert option_files.resolve('nope.yml') is None
    mine = tmp_path / 'train' / 'demo' / 'train_EDSR_W4A4_x2_embedded.yml'
    mine.parent.mkdir(parents=True)
    mine.write_text('name: mine\n')
    assert option_files.resolve(DEMO) == DEMO  # the user's own file of that path wins
    assert option_files.resolve(str(mine)) == str(mine)


def test_listing_and_the_module_cli(capsys):
    text = option_files.listing()
    lines = text.splitlines()
    assert lines[0].startswith('# 74 option files of odm-basicsr') and lines[0].endswith(str(OPTIONS))
    assert lines[1].startswith('# run one: odm-train -opt <name>')
    assert lines[2:] == ON_DISK
    assert option_files.main([]) == 0 and capsys.readouterr().out == text
    assert option_files.main([DEMO, 'test_RLFN_x4.yml']) == 0
    assert capsys.readouterr().out.split() == [option_files.path(DEMO), str(OPTIONS / 'test/RLFN/test_RLFN_x4.yml')]
    assert option_files.main(['nope.yml']) == 2 and 'no packaged option file' in capsys.readouterr().err


def test_option_files_imports_neither_basicsr_nor_torch():
    code = ('import sys; import odm_basicsr.option_files as o; o.names(); o.path("test_RLFN_x4.yml"); '
            'print(sorted(m for m in ("basicsr", "torch", "cv2", "scipy") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, check=True,
                         env=_clean_env(PYTHONPATH=str(REPO)))
    assert out.stdout.strip() == '[]'


# ------------------------------------------------------------------------------------------------ the entry points
def test_list_options_prints_the_listing_without_importing_basicsr():
    code = ('import sys; from odm_basicsr.cli import run_pipeline; run_pipeline(True, ["--list-options"]); '
            'run_pipeline(False, ["--list-options"]); assert "basicsr" not in sys.modules, "basicsr imported"')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                         env=_clean_env(PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    assert out.stdout == 2 * option_files.listing()


@pytest.mark.parametrize('is_train', [True, False])
def test_opt_takes_a_packaged_name(is_train, tmp_path, monkeypatch, capsys):
    import basicsr.test
    import basicsr.train

    from odm_basicsr.cli import run_pipeline

    module = basicsr.train if is_train else basicsr.test
    seen = []
    monkeypatch.setattr(module, 'train_pipeline' if is_train else 'test_pipeline', lambda root: seen.append(sys.argv))
    monkeypatch.chdir(tmp_path)
    name = DEMO if is_train else 'test/RLFN/test_RLFN_x4.yml'
    run_pipeline(is_train, ['-opt', f'options/{name}', '--force_yml', 'x=1'])
    assert seen[-1][1:] == ['-opt', option_files.path(name), '--force_yml', 'x=1']
    prog = 'odm-train' if is_train else 'odm-test'
    assert capsys.readouterr().err == f'{prog}: packaged option file {option_files.path(name)}\n'
    own = tmp_path / 'mine.yml'
    own.write_text('name: x\n')
    run_pipeline(is_train, ['-opt', 'mine.yml'])  # a file on disk is used as given, without a note
    assert seen[-1][1:] == ['-opt', 'mine.yml'] and capsys.readouterr().err == ''
    with pytest.raises(SystemExit) as e:
        run_pipeline(is_train, ['-opt', 'train/ODM/nope.yml'])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f'{prog}: error: option file not found: train/ODM/nope.yml (the packaged '
                                       f'ones: {prog} --list-options)\n')


def test_help_mentions_list_options():
    out = subprocess.run([sys.executable, '-m', 'odm_basicsr.train', '-h'], capture_output=True, text=True,
                         cwd=REPO, env=_clean_env(PYTHONPATH=str(REPO)))
    assert out.returncode == 0 and '-opt OPT' in out.stdout and '--list-options' in out.stdout


# ------------------------------------------------------------------------------------------------ setup.py, wheel
def _setup_kwargs():
    captured = {}
    with mock.patch('setuptools.setup', lambda **kw: captured.update(kw)):
        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            exec(compile((REPO / 'setup.py').read_text(encoding='utf-8'), 'setup.py', 'exec'), {'__name__': 'x'})
        finally:
            os.chdir(cwd)
    return captured


def test_setup_package_data_names_every_option_file():
    kw = _setup_kwargs()
    patterns = kw['package_data']['odm_basicsr']
    matched = {p.relative_to(REPO / 'odm_basicsr').as_posix() for pat in patterns
               for p in (REPO / 'odm_basicsr').glob(pat)}
    assert matched == {f'options/{n}' for n in ON_DISK}
    assert 'odm_basicsr' in kw['packages'] and not any(p.startswith('odm_basicsr.options') for p in kw['packages'])
    manifest = (REPO / 'MANIFEST.in').read_text(encoding='utf-8')
    assert re.search(r'^recursive-include odm_basicsr/options \*\.yml$', manifest, re.M)
    assert re.search(r'^include README\.md$', manifest, re.M)


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    """A wheel built from a copy of the repository's package files (as from a clean clone)."""
    work = tmp_path_factory.mktemp('wheel')
    src = work / 'src'
    src.mkdir()
    for name in ('setup.py', 'pyproject.toml', 'MANIFEST.in', 'README.md'):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / 'odm_basicsr', src / 'odm_basicsr', ignore=shutil.ignore_patterns('__pycache__'))
    out = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                          '-w', str(work / 'dist'), str(src)], capture_output=True, text=True, env=_clean_env())
    if out.returncode != 0 and ('bdist_wheel' in out.stderr or 'No module named pip' in out.stderr):
        pytest.skip(f'this environment cannot build wheels: {out.stderr.strip().splitlines()[-1]}')
    assert out.returncode == 0, out.stderr
    return next((work / 'dist').glob('odm_basicsr-*.whl'))


def test_wheel_holds_the_option_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n[len('odm_basicsr/options/'):] for n in names if n.startswith('odm_basicsr/options/')) == ON_DISK
    assert 'odm_basicsr/option_files.py' in names
    assert not any(n.startswith(('tests/', 'scripts/', 'options/')) for n in names)
    entry_points = next(n for n in names if n.endswith('.dist-info/entry_points.txt'))
    assert 'odm-train = odm_basicsr.train:main' in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_unpacked_wheel_finds_its_option_files_outside_the_clone(wheel, tmp_path):
    site = tmp_path / 'site'
    out = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', '--target',
                          str(site), str(wheel)], capture_output=True, text=True, env=_clean_env())
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    env = _clean_env(PYTHONPATH=str(site))
    code = ('import odm_basicsr, odm_basicsr.option_files as o; print(odm_basicsr.__file__); '
            f'print(o.path("{DEMO}"))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=run_dir, env=env)
    assert out.returncode == 0, out.stderr
    module, demo = out.stdout.split()
    assert module == str(site / 'odm_basicsr' / '__init__.py')
    assert demo == str(site / 'odm_basicsr' / 'options' / 'train' / 'demo' / 'train_EDSR_W4A4_x2_embedded.yml')
    listing = subprocess.run([sys.executable, '-m', 'odm_basicsr.train', '--list-options'], capture_output=True,
                             text=True, cwd=run_dir, env=env)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].endswith(str(site / 'odm_basicsr' / 'options')) and lines[2:] == ON_DISK
