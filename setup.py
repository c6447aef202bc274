"""Builds the two small compiled kernels; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "matq_format._bitplanes",
            sources=["matq_format/_bitplanes.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "matq_format._quantkernel",
            sources=["matq_format/_quantkernel.c"],
            extra_compile_args=["-O3", "-fno-trapping-math", "-ffp-contract=off"],
            optional=True,
        ),
    ]
)
