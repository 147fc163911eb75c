"""API shapes other than DMR's own and OpenAI's chat completions, and their translation to and
from the one internal chat representation (app/service/chat.py): no HTTP, no engine."""
