"""AutoLoRA (arXiv 2508.02107): retrieve adapters for a prompt from their weights, fuse them with learned gates.

* :mod:`studio.autolora.functional`: the math (probe tokens, effective low-rank forms, InfoNCE, gates);
* :mod:`studio.autolora.encoder`: the weight encoder (adapter factors -> a vector in the text space);
* :mod:`studio.autolora.zoo`: the adapter zoo of micro-world concepts, trained through ``studio batch``;
* :mod:`studio.autolora.retrieval`: encoder training, the retrieval eval, retrieving for a prompt.

docs/autolora.md is the guide and holds the measurements.
"""
