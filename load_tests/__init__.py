"""Load tests for OrbitFlow (or any OpenAI-compatible server): an open-loop streaming client,
reports in the simulator's format, and the simulator's prediction of the same trace.

    python -m load_tests --help
"""
