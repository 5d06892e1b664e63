"""HTTP APIs (A1111-compatible /sdapi/v1, OpenAI-compatible /v1)."""
