"""docs/CONFIG.md is the config schema, current and complete."""
from modecotd.config_doc import DOC, render


def test_the_config_reference_is_current_and_every_key_is_described():
    text = render()
    assert DOC.read_text() == text, "docs/CONFIG.md is stale: run python -m modecotd.config_doc"
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) > 100
    undescribed = [row.split("|")[1].strip() for row in rows if row.rstrip(" |").endswith("|") or
                   row.split("|")[4].strip() == ""]
    assert undescribed == []
    assert "| `tasks[].source.(hf) answer_convention` |" in text and "| `resources.stall_timeout_s` |" in text
