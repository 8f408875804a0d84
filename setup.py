"""llava_jax: LLaVA (CLIP ViT + projector + LLaMA) in JAX/Flax for TPUs and GPUs."""

from setuptools import find_packages, setup

setup(
    name="llava_jax",
    version="0.1.0",
    description="LLaVA visual instruction tuning in JAX/Flax: HF-exact models, conversion, data, training, inference.",
    packages=find_packages(include=["llava_jax", "llava_jax.*"]),
    # The web chat page `python -m llava_jax.serve` serves at / (plain files, no build step).
    package_data={"llava_jax": ["serve_static/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7,<0.13",
        "flax>=0.11,<0.14",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.12",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",  # tokenizer.json (Llama-3, Qwen2); read without transformers
        "protobuf",  # sentencepiece's sentencepiece_model_pb2 (the tokenizer edits the model proto)
        "ml_collections>=1.0",
        "absl-py>=2.1",
        "numpy>=1.26",
        "pillow>=10",
        "av>=12",  # PyAV, video decoding (data/video.py): its wheels carry FFmpeg; 12.0 has 3.11 and 3.12 wheels
        "tqdm>=4.66",
    ],
    extras_require={
        # tensorflow-datasets (about 230 MB with pyarrow, no TensorFlow) builds the test's tiny TFDS
        # dataset; gcsfs + gcp-storage-emulator serve gs:// on 127.0.0.1 in the tests; nbclient runs
        # the notebook; peft is the LoRA reference (never imported at run time). Not torchvision: PyPI's wheel
        # is built for CUDA torch, and beside the CPU one transformers then fails to import in any process that
        # has not run tests/_torchvision.py's placeholders (the benchmarks' PyTorch peers); tests that run
        # transformers' torchvision video processors skip without it (`pip install torchvision==0.28.0` adds it).
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=4.57",
                 "tensorflow-datasets==4.9.10", "importlib_resources==7.1.0", "gcsfs==2026.10.1",
                 "gcp-storage-emulator==2026.7.19",
                 "nbclient==0.10.2", "nbformat==5.11.1", "ipykernel==7.4.0", "peft==0.21.2",
                 "pytest-xdist==3.8.0", "fastapi==0.165.0", "uvicorn==0.55.0", "openai==3.63.0",
                 "httpx2==2.17.0", "selenium==4.51.0"],
        # `python -m llava_jax.serve` (nothing else imports them).
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        # Building and reading TFDS datasets; no TensorFlow needed (see README). importlib_resources:
        # TFDS locates builder code through etils.epath.resource.
        "tfds": ["tensorflow-datasets>=4.9", "importlib_resources>=6"],
        "gcs": ["gcsfs>=2024.2"],  # gs:// workdirs, model directories, data and images through etils.epath
        # A local GCS to try gs:// without a bucket (README: `python -m tests._gcs_emulator`, which patches
        # this version's handlers for TensorStore).
        "gcs-emulator": ["gcsfs>=2024.2", "gcp-storage-emulator==2026.7.19"],
        # libtpu for the installed jax (jax 0.10.2 -> libtpu 0.0.42.1): runs on TPU VMs, and compiles
        # for any TPU topology on any host (`--config.compile_only=True --config.compile_topology=v5e:2x4`).
        "tpu": ["jax[tpu]>=0.7,<0.13"],
    },
)
