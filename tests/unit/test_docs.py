"""docs/config.md documents every configuration key the code accepts."""

import dataclasses
from pathlib import Path

from orchestrator.config import JobConfig

ROOT = Path(__file__).resolve().parents[2]


def test_every_config_key_is_documented():
    text = (ROOT / "docs" / "config.md").read_text()
    for section in dataclasses.fields(JobConfig):
        for key in dataclasses.fields(section.type if isinstance(section.type, type)
                                      else section.default_factory):
            assert f"`{section.name}.{key.name}`" in text, f"{section.name}.{key.name}"
