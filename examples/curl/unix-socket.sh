#!/bin/sh
# Over the Unix socket, with Docker Desktop's /exp/vDD4.40 prefix, as the DMR docs show.
# Start the service with MODEL_RUNNER_SOCK set (e.g. MODEL_RUNNER_SOCK=$HOME/.docker/run/model-runner.sock);
# in a container, mount the socket's directory.
set -eu
SOCK=${MODEL_RUNNER_SOCK:-$HOME/.docker/run/model-runner.sock}
curl --fail-with-body --unix-socket "$SOCK" \
  localhost/exp/vDD4.40/engines/llama.cpp/v1/chat/completions \
  -H "Content-Type: application/json" \
  -d '{
    "model": "'"${MODEL:-ai/smollm2}"'",
    "messages": [
      {"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "Please write 50 words about the fall of Rome."}
    ]
  }'
