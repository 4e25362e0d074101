"""Built-in passes, installed as ``onnxslim.passes`` and registered through the ``onnxslim.passes``
entry-point group, the same way third-party passes are. One module per pass, named after it, grouped by
family: ``slim/`` (lossless), ``quantize/`` (int8 and what prepares for it); pruning, weight sharing and
distillation get ``prune/``, ``share/`` and ``distill/``. A family's private helpers (``_*.py``) stay inside
its folder; what two families need lives in the core (``onnxslim.graph_edit``, ``onnxslim.calibration``,
``onnxslim.sensitivity``)."""
