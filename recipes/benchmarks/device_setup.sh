# Source on the GPU machine: installs the carried wheels (diffusers, importlib_metadata, this package).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/tests && export PATH=/tmp/site/bin:$PATH
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
