"""Inference on llama.cpp: one model, one context, many sequences (no HTTP here)."""
