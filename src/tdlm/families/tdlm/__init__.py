"""The tdlm family (see family.py; its config section in config.py)."""
