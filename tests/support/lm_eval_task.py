"""A local lm-evaluation-harness multiple-choice task: layerfold's MC items as a jsonl file and a task YAML
over it, so the harness runs offline (set HF_DATASETS_OFFLINE=1) on exactly the items ``mc_accuracy`` scores."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_mc_task(folder: Path, items: Sequence[Any], name: str) -> Path:
    """``folder/items.jsonl`` and ``folder/<name>.yaml``; returns the YAML's path (its folder is a task dir)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "items.jsonl"
    path.write_text("".join(json.dumps({"context": it.context, "choices": it.choices, "label": it.label,
                                        "delimiter": it.delimiter}) + "\n" for it in items))
    yaml = folder / f"{name}.yaml"
    yaml.write_text(TASK_YAML.format(name=name, items=path))
    return yaml
