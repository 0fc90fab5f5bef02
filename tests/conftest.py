"""Session-wide fixtures: tiny checkpoints and GGUFs are built once per test session.

Fixture modules live in tests/fixtures/ (one per area) and are pulled in here.
"""
