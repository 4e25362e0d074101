"""Built-in passes, installed as ``onnxslim.passes`` and registered through the ``onnxslim.passes``
entry-point group, the same way third-party passes are. One module per pass, named after it."""
