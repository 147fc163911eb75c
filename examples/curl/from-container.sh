#!/bin/sh
# From a container in the same Compose project (the DMR docs' request, unchanged).
# From another Compose project, add to the client service:
#   extra_hosts: ["model-runner.docker.internal:host-gateway"]
# and publish model-runner's port 12434: then use http://model-runner.docker.internal:12434.
set -eu
curl --fail-with-body http://model-runner.docker.internal/engines/llama.cpp/v1/chat/completions \
  -H "Content-Type: application/json" \
  -d '{
    "model": "'"${MODEL:-ai/smollm2}"'",
    "messages": [
      {"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "Please write 50 words about the fall of Rome."}
    ]
  }'
