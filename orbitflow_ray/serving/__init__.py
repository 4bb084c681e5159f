"""Serving core without Ray: OpenAI protocol, async engine loop, central planner, routing."""
