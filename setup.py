# cffi's setuptools integration still needs this hook; everything else is in
# pyproject.toml.
from setuptools import setup

setup(cffi_modules=["vchan/_native_build.py:ffibuilder"])
