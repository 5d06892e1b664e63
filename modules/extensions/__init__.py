"""Extension system: discovery, loading, callbacks and the Script API."""
