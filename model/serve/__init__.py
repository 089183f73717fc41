"""Serving: the continuous-batching engine, the OpenAI-compatible API, the web and terminal chats."""
