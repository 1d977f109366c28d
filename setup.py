from setuptools import setup

# The Triton kernels live in the top-level ``kernels/`` folder of the repository but
# are installed as ``switch_dit.kernels`` (no generic top-level ``kernels`` module).
setup(
    packages=["switch_dit", "switch_dit.ops", "switch_dit.kernels"],
    package_dir={"switch_dit": "switch_dit", "switch_dit.kernels": "kernels"},
)
