"""odm-basicsr: ODM quantization-aware training of SR networks, as a BasicSR plugin.

Importing the package imports nothing of BasicSR, OpenCV or SciPy: the quantization core (``odm_basicsr.quant``),
the ODM training math (``odm_basicsr.odm``) and the deployment loader (``odm_basicsr.deploy``) are plain PyTorch.

The plugin's archs, datasets, losses and models enter BasicSR's registries when their subpackage is imported
(``import odm_basicsr.archs``, as HAT and Real-ESRGAN do), when an entry point (``odm-train``, ``odm-test``, ...)
runs, or when a script of yours calls :func:`register` before it uses BasicSR. Each of these first applies the
BasicSR 1.4.2 fixes of :mod:`odm_basicsr.compat`.
"""
__version__ = '0.1.0'
__all__ = ['register']


def register():
    """Apply the BasicSR fixes and register every arch, dataset, loss and model of the plugin (idempotent)."""
    import odm_basicsr.plugin  # noqa: F401  (registration happens on import)
