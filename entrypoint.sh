#!/bin/sh
# The image's entrypoint (under tini, which forwards signals and reaps children).
# `serve` (the default): check the environment and the preload manifest, say what will run,
# then exec the service so that it receives SIGTERM itself. Other arguments are CLI commands
# that need no running service (`check`, `package --store`), e.g.
#   docker run --rm -v models:/models -v $PWD:/in IMAGE package --gguf /in/x.gguf --store me/x
# Commands that talk to the service run beside it: docker exec CONTAINER python -m app ls
set -eu

# The CUDA image ships the driver stub in /opt/cuda-stubs; the real driver comes from the host
# (--gpus all). Without it, the stub lets llama.cpp load and find no GPU: it runs on the CPU.
if [ -d /opt/cuda-stubs ]; then
    if ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
        echo "model-runner: NVIDIA driver found; the service's \"backend\" log line names the" \
            "GPU it uses (MODEL_RUNNER_GPU_LAYERS=${MODEL_RUNNER_GPU_LAYERS:-all})" >&2
    else
        export LD_LIBRARY_PATH="/opt/cuda-stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "model-runner: no NVIDIA driver in this container (start it with --gpus all);" \
            "serving on the CPU" >&2
    fi
fi

if [ "$#" -eq 0 ] || [ "$1" = "serve" ]; then
    # A bad variable or manifest stops here with one line naming it.
    python -m app check
    exec python -m app serve
fi
exec python -m app "$@"
