"""A corpus of broken inputs for the ``chiasm`` command (see ``tests/test_bad_inputs.py``)."""
