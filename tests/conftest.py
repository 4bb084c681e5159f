import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(session, config, items):
    """The calibration test measures this machine's speed: run it first, before other modules
    leave Ray processes and engine threads winding down in the background."""
    items.sort(key=lambda item: 0 if item.module.__name__.endswith("test_sim_calibration") else 1)
