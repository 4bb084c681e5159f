"""OrbitFlow on Ray: SLO-aware long-context LLM serving with per-request, per-layer KV placement."""
