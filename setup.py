"""tvm_scalpel: hardware-aware DNN pruning (Scalpel, ISCA 2017) built into Apache TVM."""

from setuptools import find_packages, setup

setup(
    name="tvm_scalpel",
    version="0.1.0",
    description="Hardware-aware DNN pruning (SIMD-aware weight pruning, node pruning) in Apache TVM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["tvm_scalpel", "tvm_scalpel.*"]),
    # The QEMU instruction-count plugin is compiled from source on first use.
    package_data={"tvm_scalpel.micro": ["qemu_plugin/*.c", "qemu_plugin/*.h"]},
    install_requires=[
        # apache-tvm-ffi 0.1.15.x segfaults in save_json (MetaSchedule); keep this exact pin.
        "apache-tvm==0.27.0.post1",
        "apache-tvm-ffi==0.1.14.post1",
        # An exact pin picks the local CPU build; a range pulls gigabytes of CUDA packages.
        "torch==2.13.0",
        "numpy>=1.26,<3",
        "scipy>=1.11,<2",
        "onnx>=1.16,<2",
        "matplotlib>=3.8,<4",
        "tqdm>=4.66,<5",
        "psutil>=5.9",
        "cloudpickle>=3.0",
        "tornado>=6.4,<7",  # TVM's RPC tracker (remote hardware profiling)
    ],
    extras_require={"test": ["pytest>=8,<10", "hypothesis>=6.100,<7"]},
    entry_points={"console_scripts": ["scalpel=tvm_scalpel.cli:main"]},
)
