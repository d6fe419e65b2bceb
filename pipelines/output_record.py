"""An output's record: the settings and inputs it was made with. A stage resumes into an output only when
its record matches, and refuses otherwise (two runs never mix in one output). Settings that say how a stage
runs (how many actors, how much memory) change no result, so they stay out of the comparison: a resume on a
larger cluster may change them."""

from __future__ import annotations


def same_output(recorded: dict, wanted: dict, resource_fields: tuple[str, ...]) -> bool:
    """Records with a "config" entry; a recorded config from before a resource field existed still matches."""

    def comparable(record: dict) -> dict:
        config = {key: value for key, value in record.get("config", {}).items() if key not in resource_fields}
        return {**record, "config": config}

    return comparable(recorded) == comparable(wanted)
