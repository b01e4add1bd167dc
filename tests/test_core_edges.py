"""Behaviour the mutation run (reliability/mutants.py) found unchecked in the core modules: each test
here kills mutants that survived the rest of the suite, against values written out by hand."""

import pytest
import torch

from tokenformer import TokenFormerError
from tokenformer.models.pattention import Pattention, normalise

pytestmark = pytest.mark.usefixtures("one_thread_module")


# ---- models/pattention.py ---------------------------------------------------------------------------

def test_pattention_repr_states_sizes_normalisation_pinned_n_and_lean_mode():
    assert repr(Pattention(4, 6, 8)) == "Pattention(4 -> 6, num_tokens=8, l2_norm_gelu)"
    layer = Pattention(4, 6, 8, norm_activation_type="softmax", scale_num=3, memory_lean=True)
    assert repr(layer) == "Pattention(4 -> 6, num_tokens=8, softmax, scale_num=3, memory_lean)"


def test_unknown_normalisation_is_named_in_the_error():
    with pytest.raises(TokenFormerError, match="unknown norm_activation_type 'relu'"):
        normalise(torch.ones(2, 3), "relu", 3)


def test_lean_mode_holds_under_autocast_too():
    """The mixed-precision branch passes memory_lean on: one score-sized tensor kept, not two."""
    x = torch.randn(2, 5, 16, requires_grad=True)
    kept = {}
    for lean in (False, True):
        layer = Pattention(16, 8, 32, memory_lean=lean)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
        kept[lean] = [t for t in saved if t.shape == (2, 5, 32)]
        assert all(t.dtype == torch.bfloat16 for t in saved)
    assert len(kept[False]) == 2 and len(kept[True]) == 1
