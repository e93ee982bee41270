"""Install odm-basicsr.

basicsr 1.4.2 ships only as an sdist whose build asks for torch. Install torch first, then this package with
``--no-build-isolation`` so basicsr builds in seconds against the torch you already have (see README).
"""
from setuptools import find_packages, setup

DEPLOY = ['onnx>=1.16', 'onnxruntime>=1.18', 'onnxscript>=0.2', 'ml_dtypes']

setup(
    name='odm-basicsr',
    version='0.1.0',
    description='ODM quantization-aware training of super-resolution networks as a BasicSR plugin',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10,<3.13',
    packages=find_packages(include=['odm_basicsr', 'odm_basicsr.*']),
    # the option files (odm_basicsr/options/{train,test}/...), found by odm_basicsr.option_files and
    # `odm-train --list-options`; MANIFEST.in puts them in the sdist too. Not include_package_data: their folders
    # would then count as packages without __init__.py (setuptools warns)
    include_package_data=False,
    package_data={'odm_basicsr': ['options/**/*.yml']},
    install_requires=[
        'basicsr==1.4.2',  # brings tb-nightly (the tensorboard package); do not add `tensorboard` beside it
        'torch>=2.1',
        'torchvision',
        'numpy',
        'opencv-python',
        'lmdb',
        'matplotlib',  # odm-inspect's figure
        'pyyaml',
        'safetensors>=0.4',  # the compact deployed-model file
        'scikit-image',  # embedded demo photos (skimage.data)
        'scipy<2',  # basicsr 1.4.2 imports scipy.ndimage.filters, removed in SciPy 2
        'tqdm',
    ],
    extras_require={
        # odm-export's ONNX model and its onnxruntime checks (ml_dtypes: int4 initializers; onnxscript: PyTorch's
        # default ONNX exporter, without it the legacy TorchScript exporter is used)
        'deploy': DEPLOY,
        'test': ['pytest>=7', 'pytest-timeout', 'ruff'] + DEPLOY,
    },
    entry_points={
        'console_scripts': [
            'odm-train=odm_basicsr.train:main',
            'odm-test=odm_basicsr.test:main',
            'odm-cost=odm_basicsr.cost:main',
            'odm-demo=odm_basicsr.demo:main',
            'odm-eval=odm_basicsr.evaluate:main',
            'odm-inspect=odm_basicsr.inspect_layers:main',
            'odm-export=odm_basicsr.export:main',
        ],
    },
)
