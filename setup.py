from pathlib import Path

from setuptools import find_packages, setup


def _requirements(name):
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="ibm-fms",
    version="0.1.0",
    description="Foundation Model Stack with paged attention on PyTorch FlexAttention",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["fms", "fms.*"]),
    package_data={"fms.resources": ["tokenizer/*", "eval/*", "eval/*/*", "gemv/*"]},
    include_package_data=True,
    entry_points={"console_scripts": ["fms = fms.entrypoints.cli:main"]},
    install_requires=_requirements("requirements.txt"),
    extras_require={
        "hf": _requirements("hf-requirements.txt"),
        "test": _requirements("test-requirements.txt"),
        "eval": ["lm-eval>=0.4", "pyarrow>=14"],  # the harness adapter; parquet task data
    },
)
