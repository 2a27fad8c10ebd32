"""The README's library quickstart runs as written (on a tiny model instead of SmolLM2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest


@pytest.mark.usefixtures("one_thread")
def test_the_readme_quickstart_runs() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    code = next(b for b in blocks if "load_model(" in b and "speculative_generate(" in b)
    assert 'load_model("smollm2-135m")' in code
    scope: dict = {}
    exec(compile(code.replace('load_model("smollm2-135m")', 'load_model("tiny-llama")'), "README.md", "exec"), scope)
    out, m, lens = scope["out"], scope["m"], scope["lens"]
    assert out.new_tokens == 32 and m.log_probs.shape[1] == 2 and lens.kl.shape[0] > 0
