"""Real, validated configs for tests, so that a test's config follows the schema (a hand-made
stand-in could drift from it): the smallest valid run config with the sections a test sets."""
from __future__ import annotations

from modecotd.config import RunConfig
from modecotd.config_loading import parse_config

SMALLEST = {
    "name": "test",
    "tasks": [{"name": "sums", "role": "seen", "source": {"kind": "generated", "family": "arithmetic"},
               "sizes": {"train": 4, "fewshot": 2, "test": 2}}],
    "teacher": {"backend": "scripted"},
}


def run_config(**sections) -> RunConfig:
    """The smallest valid config with each given section's keys set over it (one level deep:
    ``run_config(evaluation={"batch_size": 2})`` keeps the rest of the evaluation section's defaults)."""
    data = {key: dict(value) if isinstance(value, dict) else value for key, value in SMALLEST.items()}
    for section, value in sections.items():
        data[section] = {**data.get(section, {}), **value} if isinstance(value, dict) else value
    return parse_config(data)
