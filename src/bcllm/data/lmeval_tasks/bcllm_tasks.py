"""Loader for bcllm's bundled lm-eval tasks: the documents lie beside this file, so the tasks work
from an installed package and from any working directory, offline (no Hugging Face Hub lookup)."""

import json
from pathlib import Path


def load_docs(data_file: str, **_metadata):
    """The JSONL file `data_file` (beside this file) as lm-eval's one `test` split."""
    import datasets

    path = Path(__file__).parent / data_file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
