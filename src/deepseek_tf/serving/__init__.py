"""HTTP serving: OpenAI-compatible completions/chat and TF-Serving predict."""
