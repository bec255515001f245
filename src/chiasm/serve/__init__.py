"""An OpenAI-compatible HTTP server for a saved model (``chiasm serve``); see :mod:`chiasm.serve.app`."""
