"""mtp_lib: multi-token prediction analyses for any Hugging Face causal LM.

The library behind the executable book of "On multi-token prediction for efficient LLM inference"
(Mehra, Alonso Garcia, Mauch, 2025). One module a concern: ``models``, ``data``, ``results``,
``marginal`` (with its GPU kernels in ``kernels``), ``lens``, ``heads``, ``train``, ``decode`` (with
``self_distill``: draft heads trained on the model's own output), ``metrics``,
``plots``, ``book``.
"""

__version__ = "0.1.0"
