#!/bin/sh
# From the host, over TCP (the published port 12434).
set -eu
curl --fail-with-body http://localhost:12434/engines/llama.cpp/v1/chat/completions \
  -H "Content-Type: application/json" \
  -d '{
    "model": "'"${MODEL:-ai/smollm2}"'",
    "messages": [
      {"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "Please write 50 words about the fall of Rome."}
    ]
  }'
