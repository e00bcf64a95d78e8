"""Configuration of the NTK / approximation measurement (``edgefuse ntk``, :func:`edgefuse.ntk.api.measure_ntk`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgefuse.config import StrictModel

NtkParams = Literal["fused-mlp", "all", "modules"]
NTK_PARAMS: tuple[str, ...] = ("fused-mlp", "all", "modules")
NTK_PROTOCOLS: tuple[str, ...] = ("custom", "paper")


def paper_layers(n_layers: int) -> list[int]:
    """The upper two thirds of ``n_layers`` (the layers the authors fuse: 4-11 of 12).

    Example:
        >>> paper_layers(12), paper_layers(6)
        ([4, 5, 6, 7, 8, 9, 10, 11], [2, 3, 4, 5])
    """
    return list(range(n_layers - (2 * n_layers) // 3, n_layers))
NtkOutput = Literal["auto", "class0-prob", "gold-logit", "pooled-projection", "last-token-logprob"]
NTK_OUTPUTS: tuple[str, ...] = ("auto", "class0-prob", "gold-logit", "pooled-projection", "last-token-logprob")


class NtkConfig(StrictModel):
    """How to measure the empirical NTKs of an original and a compressed model.

    Example:
        >>> NtkConfig(params="all").n_examples
        64
    """

    params: NtkParams = Field(
        "fused-mlp",
        description="Parameter set of the kernels. fused-mlp: the up/gate/down modules (weights and biases) of "
        "every MLP the compressed model changed, and of the same MLPs in the original. all: every trainable "
        "parameter of each model. modules: the parameters of the modules named in 'modules' (the paper's "
        "protocol: the MLP of an unfused layer). The frozen fusion scale is a buffer and never part of any set.",
    )
    modules: list[str] | None = Field(
        None,
        description="params modules: module names (as in model.named_modules(); a 're:' prefix makes an entry a "
        "regular expression) whose parameters, with those of their sub-modules, form the kernel's parameter set.",
    )
    output: NtkOutput = Field(
        "auto",
        description="Scalar output f(x) whose gradient defines the kernels. class0-prob: softmax(logits)[0] of a "
        "sequence classifier. gold-logit: the logit of the example's label. pooled-projection: "
        "the mean-pooled last hidden state projected on a fixed seeded random unit vector (a shared random "
        "'head' for models without one). last-token-logprob: log p(last token | the tokens before it) of a "
        "language model. auto: class0-prob for classifiers, last-token-logprob for causal/seq2seq LMs, else "
        "pooled-projection.",
    )
    n_examples: int = Field(64, ge=1, description="Number of examples n (the kernels are n x n); the first n are used.")
    max_length: int = Field(128, ge=2, description="Truncate every example to this many tokens.")
    head_seed: int = Field(0, description="Seed of the random projection vector of output=pooled-projection.")
    max_gradient_mib: float = Field(
        1024.0,
        gt=0,
        description="Memory for the per-example gradients of one parameter chunk (gradients and their signs, "
        "fp32). Larger parameter sets are processed in several chunks, each with its own forward/backward passes.",
    )

    @model_validator(mode="after")
    def _modules_given(self) -> NtkConfig:
        if (self.params == "modules") != bool(self.modules):
            raise ValueError(
                f"params 'modules' needs a non-empty 'modules' list, and 'modules' needs params 'modules' "
                f"(got params={self.params!r}, modules={self.modules})"
            )
        return self
