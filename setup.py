"""Automated online layer caching: compiler pass, runtime, tools."""
from setuptools import find_packages, setup

# The inference server (python -m runtime.server); the library itself does not need it.
# httptools + uvloop (uvicorn picks them up) and orjson halve the server's per-request CPU
# (docs/load_test.md); without them it runs the same, slower.
SERVE = ["fastapi", "uvicorn", "prometheus-client", "pillow", "orjson", "httptools",
         "uvloop; sys_platform != 'win32'"]


setup(
    name="layer-cache",
    version="0.1.0",
    description="Early-exit caches for pre-trained PyTorch models, learned online from live traffic",
    packages=find_packages(include=["compiler*", "runtime*", "tools*"]),
    package_data={"tools": ["assets/*"]},
    python_requires=">=3.10",
    # Pinned to what works together here: torchvision's wheels are CUDA builds that run on CPU;
    # the CPU-only torch build cannot import torchvision.
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "onnx==1.23.2",
        "onnxscript==0.7.2",
        "onnxruntime==1.31.1",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "serve": SERVE,
        "test": ["pytest", "httpx", "tritonclient[http]", "locust"],
        "gpu": ["onnxruntime-gpu==1.31.1"],
        # mAP@0.5 of the detection demo and benchmarks (tools.train_detector.map50).
        "detection": ["torchmetrics==1.9.0", "pycocotools==2.0.11"],
        # Scale-out on Ray Serve (python -m runtime.scaleout): Ray plus the server's own extras.
        "ray": ["ray[serve]==2.60.0", "httpx"] + SERVE,
    },
    entry_points={"console_scripts": ["layer-cache-server=runtime.server.__main__:main"]},
)
