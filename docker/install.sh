#!/bin/sh
# The installer stage of both images: the service and its dependencies, from the builder's
# wheels, into /opt/model-runner (a venv without pip), with llama.cpp's libraries slimmed.
# Usage: install.sh WHEEL_DIR
set -eu
wheels="$1"

python3 -m venv --without-pip /opt/model-runner
python3 -m pip --python /opt/model-runner/bin/python install --no-cache-dir --no-index \
    --find-links "$wheels" "model-runner[engine]"

site=$(/opt/model-runner/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The llama-cpp-python wheel also unpacks a second copy of llama.cpp's libraries and their
# CMake/pkg-config files at site-packages/lib; the package loads its own copy in llama_cpp/lib.
rm -rf "$site/lib"
# Wheels cannot hold symlinks, so libX.so and libX.so.0 are full copies of libX.so.0.N.M.
cd "$site/llama_cpp/lib"
for lib in *.so.*.*; do
    soname=$(printf '%s' "$lib" | sed -E 's/(\.so\.[0-9]+)\..*$/\1/')
    ln -sf "$lib" "$soname"
    ln -sf "$lib" "${lib%%.so.*}.so"
done
find /opt/model-runner -name __pycache__ -prune -exec rm -rf {} +
