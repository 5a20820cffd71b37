"""ringlab: collective-communication algorithms you can read, run and measure."""
from setuptools import setup

setup(
    name="ringlab",
    version="0.2.0",
    description="Ring all-reduce and friends over mpi4py, with NumPy (CPU) and CuPy (GPU) buffers",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Only `ringlab` lands in site-packages: the repo's collectives/ is the package itself, kernels/ its
    # ringlab.kernels (the card's top-level folders stay; the import names are ringlab's alone).
    packages=["ringlab", "ringlab.gpu", "ringlab.teach", "ringlab.bench", "ringlab.kernels"],
    package_dir={"ringlab": "collectives", "ringlab.kernels": "kernels"},
    install_requires=[
        "numpy>=1.24",
        "mpi4py>=4.0",
        "mpich>=4.1; platform_system == 'Linux'",  # an MPI from PyPI: no apt or root step needed
        "ml_dtypes>=0.4",
        "matplotlib>=3.7",
    ],
    extras_require={
        "gpu": ["numba-cuda>=0.20", "cupy-cuda13x"],         # CUDA 13 drivers/toolkits
        "gpu-cuda12": ["numba-cuda>=0.20", "cupy-cuda12x"],  # CUDA 12
        "test": ["pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6.80", "numba>=0.59", "numba-cuda>=0.20",
                 "pyflakes>=3"],
        "torch": ["torch>=2.4"],   # DDP hooks (ringlab.ddp_hooks), the "ringlab" c10d backend; CPU build: torch==2.13.0 here
    },
)
