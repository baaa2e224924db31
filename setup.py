"""setuptools entry point: only here because `cffi_modules` is a setup() keyword."""
from setuptools import setup

setup(cffi_modules=["csrc/build_shim.py:ffibuilder"])
