"""Named measurement protocols of ``edgefuse ntk``.

``paper`` is the authors' check (the NTK section of docs/ntk.md): fuse the upper two thirds of the layers with k-means
``n_init`` 30, then take the Adam (sign) kernel of ``f = softmax(logits)[0]`` of a random classification head
over the parameters of the **lowest layer's MLP**, which that protocol leaves unfused. What it can and cannot
see is in ``docs/ntk.md``: on an unfused lower layer, fusion and merge have identical kernels by construction.

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> m = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=6, num_attention_heads=2,
    ...                                              intermediate_size=16))
    >>> d = paper_defaults(m)
    >>> d["layers"], d["modules"]
    ([2, 3, 4, 5], ['bert.encoder.layer.0.intermediate.dense', 'bert.encoder.layer.0.output.dense'])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from edgefuse.config.ntk import paper_layers
from edgefuse.errors import ConfigError
from edgefuse.fusion.sites import find_mlps

PAPER_N_INIT = 30  # the authors' k-means restarts (their released code)
PAPER_OUTPUT = "class0-prob"  # f = softmax(logits)[0] of the (random) classification head


def paper_defaults(model: nn.Module) -> dict[str, Any]:
    """The paper protocol's settings for ``model``: the fused ``layers`` (upper two thirds), the kernel's
    ``modules`` (the lowest MLP layer's up/gate/down modules), ``n_init`` and ``output``.

    Raises:
        ConfigError: the model has too few MLP layers to leave a lower one unfused.
    """
    sites = find_mlps(model)
    present = sorted({s.layer for s in sites})
    if len(present) < 2:
        raise ConfigError(f"the paper protocol needs at least 2 MLP layers (an unfused one to measure); got {present}")
    layers = [present[i] for i in paper_layers(len(present))]
    lowest = [s for s in sites if s.layer == present[0]]
    names = []
    for s in lowest:
        for path in (s.kind.gate, s.kind.up, s.kind.down):
            if path is not None:
                names.append(f"{s.name}.{path}")
    return {"layers": layers, "modules": names, "n_init": PAPER_N_INIT, "output": PAPER_OUTPUT}
