"""The option files that ship with the package (``odm_basicsr/options/{train,test}/...``), found by name.

They are package data, so they are there in a clone, an editable install and a wheel alike::

    odm-train --list-options                      # their names and the folder that holds them
    odm-train -opt train/demo/train_EDSR_W4A4_x2_embedded.yml     # -opt takes a packaged name...
    odm-train -opt my_copy.yml                    # ...or, as always, a file of yours

    from odm_basicsr import option_files
    option_files.path('train/ODM/train_ODM_EDSR_W4A4_x4.yml')   # its absolute path
    option_files.names('test')                                  # every test file, by name

A name is the path below ``odm_basicsr/options`` (``train/ODM/train_ODM_EDSR_W4A4_x4.yml``); the ``options/``
prefix of the former top-level folder of the repository (``options/train/...``) and a bare file name that is unique are
accepted too. Paths inside the files (datasets, pretrained weights) are relative to the working directory, as
BasicSR reads them, not to the file: run from the folder that holds ``datasets/`` and ``pretrained/``, or copy the
file and edit them.

Plain Python: importing this module imports neither BasicSR nor torch.
"""
import difflib
import os
import sys

__all__ = ['root', 'names', 'path', 'resolve', 'listing']

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'options')
KINDS = ('train', 'test')


def root():
    """str: The folder that holds the packaged option files."""
    return _ROOT


def names(kind=None):
    """Sorted names (``/``-separated paths below :func:`root`) of the packaged option files.

    Args:
        kind (str | None): ``'train'`` or ``'test'`` for one folder only. Default: None (both).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f'kind must be one of {KINDS} or None, got {kind!r}')
    found = []
    for top in (kind,) if kind else KINDS:
        base = os.path.join(_ROOT, top)
        for folder, _, files in os.walk(base):
            rel = os.path.relpath(folder, _ROOT).replace(os.sep, '/')
            found += [f'{rel}/{f}' for f in files if f.endswith(('.yml', '.yaml'))]
    return sorted(found)


def _lookup(name):
    """The packaged name that ``name`` stands for, or None."""
    key = str(name).replace(os.sep, '/').replace('\\', '/')
    while key.startswith('./'):
        key = key[2:]
    all_names = names()
    for candidate in (key, key[len('options/'):] if key.startswith('options/') else None):
        if candidate in all_names:
            return candidate
    if '/' not in key:
        matches = [n for n in all_names if n.rsplit('/', 1)[-1] == key]
        if len(matches) == 1:
            return matches[0]
    return None


def path(name):
    """The absolute path of the packaged option file ``name`` (see the module docstring for the accepted forms).

    Raises:
        FileNotFoundError: naming the closest packaged names.
    """
    found = _lookup(name)
    if found is None:
        all_names = names()
        key = str(name).replace('\\', '/')
        close = difflib.get_close_matches(key[len('options/'):] if key.startswith('options/') else key, all_names,
                                          n=3, cutoff=0.8)
        by_file = {n.rsplit('/', 1)[-1]: n for n in all_names}
        close += [by_file[f] for f in difflib.get_close_matches(key.rsplit('/', 1)[-1], list(by_file), n=3)]
        hint = f'; did you mean {", ".join(dict.fromkeys(close))}?' if close else ''
        raise FileNotFoundError(f'no packaged option file {name!r} ({len(all_names)} in {_ROOT}: '
                                f'odm-train --list-options){hint}')
    return os.path.join(_ROOT, *found.split('/'))


def resolve(arg):
    """What an ``-opt`` argument names: ``arg`` itself if it is a file, else the packaged option file it names,
    else None."""
    if os.path.isfile(arg):
        return arg
    found = _lookup(arg)
    return None if found is None else path(found)


def listing():
    """The text ``odm-train --list-options`` prints: two comment lines, then one name per line."""
    from odm_basicsr import __version__

    all_names = names()
    lines = [f'# {len(all_names)} option files of odm-basicsr {__version__} in {_ROOT}',
             '# run one: odm-train -opt <name> (odm-test -opt for test/...); copy one to edit it: '
             f'cp {os.path.join(_ROOT, "<name>")} .']
    return '\n'.join(lines + all_names) + '\n'


def main(argv=None):
    """``python -m odm_basicsr.option_files [NAME ...]``: the listing, or the absolute path of each NAME."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        sys.stdout.write(listing())
        return 0
    try:
        for name in argv:
            print(path(name))
    except FileNotFoundError as e:
        print(f'odm_basicsr.option_files: error: {e.args[0]}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
