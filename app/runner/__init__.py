"""A runner: a child process serving one model in one mode on a Unix socket (OpenAI routes)."""
