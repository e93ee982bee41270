"""Import every ``*<suffix>.py`` module of a subpackage so that its classes register themselves."""
import importlib
import os


def import_modules_with_suffix(package_name, package_file, suffix):
    """Import ``<package_name>.<file>`` for every ``<file><suffix>.py`` beside ``package_file``.

    Mirrors BasicSR's own scan (which only looks inside ``basicsr/``), for this plugin's folders.
    """
    folder = os.path.dirname(os.path.abspath(package_file))
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(f'{suffix}.py'))
    return [importlib.import_module(f'{package_name}.{n}') for n in names]
