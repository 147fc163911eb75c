"""The official OpenAI SDK against model-runner, unchanged but for base_url.

pip install openai
python examples/python/chat.py                  # MODEL_RUNNER_URL, MODEL to change them
"""

from __future__ import annotations

import os

from openai import OpenAI

base_url = os.environ.get("MODEL_RUNNER_URL", "http://localhost:12434") + "/engines/llama.cpp/v1"
model = os.environ.get("MODEL", "ai/smollm2")
client = OpenAI(base_url=base_url, api_key="not-needed")

# Streamed, token by token.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Write a haiku about containers."}],
    max_tokens=64,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

# Embeddings need a model run in embedding mode; any GGUF serves them.
emb = client.embeddings.create(model=model, input=["hello", "world"])
print(f"{len(emb.data)} embeddings of {len(emb.data[0].embedding)} dimensions")
