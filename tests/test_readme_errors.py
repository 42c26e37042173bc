"""The README answers the errors users meet, under those errors' own words: a user who searches
for the message finds the fix. The words are taken from the installed library, not copied."""
import pathlib
import re

import pytest
import torch

from fused_adam import FusedAdamW

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _words(text):
    return re.sub(r"\s+", " ", text.replace("*", "")).strip()


def test_lightnings_refusal_to_clip_is_answered_in_the_readme():
    """Lightning refuses `gradient_clip_val` under "bf16-mixed" for an optimizer that unscales
    in its step; the README quotes that message and answers it with FusedGradientClipping."""
    precision = pytest.importorskip("lightning.pytorch.plugins.precision")
    plugin = precision.MixedPrecision("bf16-mixed", "cpu")
    optimizer = FusedAdamW([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(RuntimeError) as refused:
        plugin.clip_gradients(optimizer, clip_val=1.0)
    message = _words(str(refused.value))
    readme = _words(README.read_text())
    assert message in readme, message
    after = readme[readme.index(message):][:800]
    assert "FusedGradientClipping" in after, after
